"""TLS (tls-creds) without a return path: the source never reads its channels'
reverse direction, where a TLS 1.3 server sends its session tickets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from e2e_support import MiB, Migration

from tls_creds import make_creds


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("multifd", [True, False])
def test_tls_without_return_path_delivers_the_whole_stream(
    migration: Callable[..., Migration], tmp_path: Path, ca: trustme.CA, multifd: bool
) -> None:
    # Large enough that the end of the stream is still in the source's socket
    # buffers when it closes its channels.
    creds = str(make_creds(tmp_path / "tls", trust=ca, server=ca, client=ca))
    m = migration(
        sizes=(32 * MiB,),
        capabilities={"multifd": multifd},
        parameters={"tls-creds": creds, "multifd-channels": 2},
    )
    m.assert_completed()
    m.assert_completed()
