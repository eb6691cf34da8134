"""The atheris targets (fuzz_targets.py) run in every test run, without atheris:
their seeds decode, and a few hundred mutated seeds and random inputs per
target give records or a `WireError`, never another exception."""

from __future__ import annotations

import random
import struct

import pytest
from fuzz_targets import TARGETS, run, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MUTANTS = 200  # per target; seeded, so a failure replays
# Values that sit on the edges of the decoders' length and count checks.
EDGES = [
    struct.pack(">I", v) for v in (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x7FFFFFFF, 0xFFFFFFFF)
]


def mutate(rng: random.Random, seed: bytes, others: tuple[bytes, ...]) -> bytes:
    """One libFuzzer-like mutation of `seed`, kept near its structure: a
    header field changed, a cut, a bit flip, a splice with another seed."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        at = rng.randrange(len(data) + 1)
        if kind == 0 and data:  # flip a bit (mostly near the start, where the headers are)
            at = min(at, rng.randrange(min(len(data), 512)))
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:  # write an edge value
            data[at : at + 4] = rng.choice(EDGES)
        elif kind == 2:  # cut
            del data[at:]
        elif kind == 3:  # insert random bytes
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 4:  # drop a few bytes
            del data[at : at + rng.randint(1, 16)]
        else:  # splice in part of another seed
            other = rng.choice(others)
            start = rng.randrange(len(other) + 1)
            data[at:] = other[start : start + rng.randint(1, 64)] + data[at:]
    return bytes(data)


@pytest.mark.parametrize("name", list(TARGETS))
def test_seeds_decode_without_error(name: str) -> None:
    """The seeds are valid inputs: a fuzzer starting from them starts deep."""
    for seed in seeds(name):
        assert run(TARGETS[name], seed) is None, (name, seed[:32])


@pytest.mark.parametrize("name", list(TARGETS))
def test_mutated_seeds_give_records_or_wire_error(name: str) -> None:
    target, corpus = TARGETS[name], seeds(name)
    rng = random.Random(name)
    refused = 0
    for _ in range(MUTANTS):
        refused += run(target, mutate(rng, rng.choice(corpus), corpus)) is not None
    # Both outcomes happen: the mutations reach the checks, not only the ends.
    assert 0 < refused < MUTANTS, (name, refused)


RANDOM = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("name", list(TARGETS))
@RANDOM
@given(data=st.binary(max_size=2048))
def test_random_bytes_give_records_or_wire_error(name: str, data: bytes) -> None:
    run(TARGETS[name], data)
