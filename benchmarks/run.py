"""Runs the issue 7 benchmarks from a checkout: `python benchmarks/run.py --size 1G`.

The scenarios live in the installed package (multifd.bench), so that
`multifd bench` and this script run the same code with the same options.
"""

from __future__ import annotations

import sys

from multifd.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
