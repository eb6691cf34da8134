"""Coverage-guided fuzzing of the wire decoders with atheris, run by hand.

    python tests/fuzz/fuzz_wire.py --target packet -atheris_runs=100000
    python tests/fuzz/fuzz_wire.py --list

Arguments other than ours go to libFuzzer (``-max_len=``, ``-timeout=``, a
corpus directory …). Without a corpus directory the target's seeds are written
to ``tests/fuzz/corpus/<target>/`` and fuzzing starts from there; libFuzzer adds
what it finds to the same directory. A crash (any exception but `WireError`)
is saved as ``crash-<sha1>``; replay it with ``--replay FILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from types import ModuleType

atheris: ModuleType | None
try:
    import atheris
except ImportError:  # optional: the targets also run under pytest without it
    atheris = None

if atheris is not None:
    # Instrument our code only (imported for the first time here, by the
    # targets): coverage of numpy or zlib would only add noise.
    with atheris.instrument_imports(include=["multifd"]):
        import fuzz_targets
else:
    import fuzz_targets

CORPUS = Path(__file__).resolve().parent / "corpus"


def _write_seeds(target: str, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for seed in fuzz_targets.seeds(target):
        (directory / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(fuzz_targets.TARGETS), default="main")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--replay", type=Path, help="run one input file through the target")
    ours, libfuzzer = parser.parse_known_args(argv[1:])
    if ours.list:
        for name, target in fuzz_targets.TARGETS.items():
            print(f"{name:14} {(target.__doc__ or '').splitlines()[0]}")
        return 0
    target = fuzz_targets.TARGETS[ours.target]
    if ours.replay is not None:
        error = fuzz_targets.run(target, ours.replay.read_bytes())
        print(f"{ours.target}: {error or 'decoded without error'}")
        return 0

    if atheris is None:
        print(
            "atheris is not installed: pip install -e '.[fuzz]' (or run the same targets "
            "without it: python -m pytest tests/fuzz)",
            file=sys.stderr,
        )
        return 2
    if not any(not arg.startswith("-") for arg in libfuzzer):
        corpus = CORPUS / ours.target
        _write_seeds(ours.target, corpus)
        libfuzzer.append(str(corpus))
    atheris.Setup([argv[0], *libfuzzer], lambda data: fuzz_targets.run(target, data))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
