"""Fixtures for the wire tests: the QEMU 7.2 recordings, decompressed once per session."""

from __future__ import annotations

import pytest
from wire_support import MULTIFD_RECORDING_NAMES, RECORDING_NAMES, Recording, RecordingStore


@pytest.fixture(scope="session")
def recordings() -> RecordingStore:
    return RecordingStore()


@pytest.fixture(params=RECORDING_NAMES)
def recording(request: pytest.FixtureRequest, recordings: RecordingStore) -> Recording:
    return recordings[request.param]


@pytest.fixture(params=MULTIFD_RECORDING_NAMES)
def multifd_recording(request: pytest.FixtureRequest, recordings: RecordingStore) -> Recording:
    return recordings[request.param]
