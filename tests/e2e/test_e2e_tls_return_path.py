"""TLS (tls-creds) together with the return-path capability: one TLS session on
the main channel, read by one thread while another writes it, at both ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from e2e_support import MiB, Migration, wait_until, write_pages

from multifd.wire.verify import VerifySection
from tls_creds import make_creds

RETURN_PATH = {"return-path": True}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_creds(tmp_path: Path, ca: trustme.CA) -> str:
    """One directory for both ends: a server and a client certificate from one CA."""
    return str(make_creds(tmp_path / "tls", trust=ca, server=ca, client=ca))


# Repeated: the two threads meet at different moments each time.
@pytest.mark.parametrize("attempt", range(3))
@pytest.mark.parametrize("multifd", [True, False])
def test_tls_with_return_path_completes(
    migration: Callable[..., Migration], tls_creds: str, multifd: bool, attempt: int
) -> None:
    m = migration(
        sizes=(4 * MiB,),
        capabilities={**RETURN_PATH, "multifd": multifd},
        parameters={"tls-creds": tls_creds},
    )
    src, _ = m.assert_completed()
    assert src["x-return-path"] == {"pongs": [1], "shut": 0}
    # The same ends again: a second session on each side.
    src, _ = m.assert_completed()
    assert src["x-return-path"] == {"pongs": [1], "shut": 0}


def test_tls_with_return_path_a_verify_mismatch_fails_the_source(
    migration: Callable[..., Migration], tls_creds: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = migration(
        sizes=(2 * MiB, 1 * MiB),
        capabilities={**RETURN_PATH, "x-verify": True},
        parameters={"tls-creds": tls_creds},
    )
    compare = m.destination._verify

    def corrupt_then_compare(section: VerifySection) -> None:
        write_pages(m.dst_blocks[1], [3, 7])
        compare(section)

    monkeypatch.setattr(m.destination, "_verify", corrupt_then_compare)
    src, dst = m.run()
    assert dst["status"] == "failed", dst
    assert m.resumed == []
    assert src["status"] == "failed", src
    error = src["error-desc"]
    assert error.startswith("the destination reported failure (SHUT 1): "), error
    assert 'block "block1": 2 page(s) differ' in error, error
    assert src["x-return-path"] == {"pongs": [1], "shut": 1}
    assert m.stops == m.source_resumes == 1
    monkeypatch.undo()
    m.assert_completed()


def test_tls_with_return_path_a_destination_cancel_reaches_the_source(
    migration: Callable[..., Migration], tls_creds: str
) -> None:
    """The SHUT comes from the cancelling thread while the destination's migration
    thread is reading the same TLS session."""
    m = migration(
        sizes=(16 * MiB,),
        capabilities=RETURN_PATH,
        parameters={"tls-creds": tls_creds, "max-bandwidth": 32 * MiB},
    )
    m.start()
    wait_until(
        lambda: m.destination.query().get("x-ram", {}).get("transferred", 0) > 2 * MiB,
        what="part of round 1 received",
    )
    m.destination.cancel()
    src, dst = m.finish()
    assert dst["status"] == "cancelled", dst
    assert src["status"] == "failed", src
    assert src["error-desc"] == (
        "the destination reported failure (SHUT 1): cancelled at the destination"
    )
    m.source.set_parameters({"max-bandwidth": 0})
    m.assert_completed()
