"""`multifd bench`: bulk, live, raw-loopback and dirty-tracking benchmarks, with
every figure also a ratio to a baseline measured in the same run."""

from .command import add_arguments, run_command
from .options import PAIRINGS, SCENARIOS, BenchOptions
from .report import markdown, plot, render
from .run import failures, run_bench

__all__ = [
    "PAIRINGS",
    "SCENARIOS",
    "BenchOptions",
    "add_arguments",
    "failures",
    "markdown",
    "plot",
    "render",
    "run_bench",
    "run_command",
]
