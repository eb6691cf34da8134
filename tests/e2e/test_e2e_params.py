"""Invalid capabilities, parameters and URIs are refused, in QEMU's words,
before anything starts: no thread, no socket, no file, the status untouched,
and the settings as they were."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import MiB, Migration, wait_until

from multifd.channels import URIError
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.multifd_send import MultifdSender
from multifd.migration.params import MigrationConfigError
from multifd.migration.rate_limit import STEP_SECONDS, RateLimit
from multifd.migration.source import MigrationSource

BAD_PARAMETERS = [
    (
        {"multifd-channels": 0},
        "Parameter 'multifd-channels' expects an integer in the range of 1 to 255",
    ),
    (
        {"multifd-channels": 256},
        "Parameter 'multifd-channels' expects an integer in the range of 1 to 255",
    ),
    ({"multifd-compression": "lz4"}, "Parameter 'multifd-compression' does not accept value 'lz4'"),
    (
        {"downtime-limit": 2_000_001},
        "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 milliseconds",
    ),
    ({"max-bandwidth": -1}, "Parameter 'max-bandwidth' expects an integer in the range of 0"),
    (
        {"max-bandwidth": "fast"},
        "Invalid parameter type for 'max-bandwidth', expected: integer",
    ),
    ({"multifd-channels": "4"}, "Invalid parameter type for 'multifd-channels', expected: integer"),
    ({"multifd-channels": 2.0}, "Invalid parameter type for 'multifd-channels', expected: integer"),
    (
        {"multifd-channels": True},
        "Invalid parameter type for 'multifd-channels', expected: integer",
    ),
    (
        {"multifd-compression": 1},
        "Invalid parameter type for 'multifd-compression', expected: string",
    ),
    ({"multifd-zstd-level": 21}, "Parameter 'multifd-zstd-level' expects an integer in the range"),
    ({"x-dirty-tracker": "magic"}, "Parameter 'x-dirty-tracker' does not accept value 'magic'"),
    ({"no-such-parameter": 1}, "Parameter 'no-such-parameter' is unexpected"),
    # QEMU 7.2's others, with its ranges.
    (
        {"compress-level": 10},
        "Parameter 'compress-level' expects an integer in the range of 0 to 9",
    ),
    ({"compress-threads": 0}, "Parameter 'compress-threads' expects an integer in the range"),
    ({"announce-step": 0}, "Parameter 'announce-step' expects an integer in the range of 1 to"),
    ({"announce-rounds": 1001}, "Parameter 'announce-rounds' expects an integer in the range"),
    ({"x-checkpoint-delay": 2**32}, "Parameter 'x-checkpoint-delay' expects an integer in the"),
    (
        {"xbzrle-cache-size": 12288},
        "Parameter 'xbzrle-cache-size' expects a power of two no less than the target page size",
    ),
    ({"xbzrle-cache-size": 2048}, "Parameter 'xbzrle-cache-size' expects a power of two"),
    (
        {"compress-wait-thread": 1},
        "Invalid parameter type for 'compress-wait-thread', expected: boolean",
    ),
    (
        {"max-cpu-throttle": 10},
        "Parameter 'max-cpu-throttle' expects an integer in the range of "
        "cpu-throttle-initial to 99",
    ),
    ({"tls-creds": 1}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ({"block-bitmap-mapping": "x"}, "Invalid parameter type for 'block-bitmap-mapping', expected"),
    (
        {"block-bitmap-mapping": [{"node-name": "a"}]},
        "Parameter 'block-bitmap-mapping[0].alias' is missing",
    ),
    (
        {"block-bitmap-mapping": [{"node-name": "a", "alias": "1x", "bitmaps": []}]},
        "Invalid mapping given for block-bitmap-mapping: The node alias '1x' is not well-formed",
    ),
    (
        {
            "block-bitmap-mapping": [
                {"node-name": "a", "alias": "x", "bitmaps": []},
                {"node-name": "a", "alias": "y", "bitmaps": []},
            ]
        },
        "Invalid mapping given for block-bitmap-mapping: The node name 'a' is mapped twice",
    ),
    # One bad entry refuses the whole request: the good one is not applied either.
    ({"multifd-channels": 8, "downtime-limit": -5}, "Parameter 'downtime-limit' expects"),
]

BAD_CAPABILITIES = [
    ({"xbzrle": True}, "Capability 'xbzrle' is not supported by this implementation"),
    ({"postcopy-ram": True}, "Capability 'postcopy-ram' is not supported"),
    ({"no-such-capability": True}, "Parameter 'capability' does not accept value"),
    ({"multifd": "yes"}, "Invalid parameter type for 'state' of 'multifd', expected: boolean"),
    ({"multifd": True, "compress": True}, "Capability 'compress' is not supported"),
]

MULTIFD_REFUSED = ["exec:cat > /dev/null", "file:{tmp}/stream", "fd:0"]
MALFORMED = [
    ("tcp:127.0.0.1", "tcp: needs HOST:PORT"),
    ("tcp:127.0.0.1:65536", "port '65536' is not a number from 0 to 65535"),
    ("tcp:::1:4444", "an IPv6 address needs brackets"),
    ("tcp:host:1,to=2", "tcp: options"),
    ("unix:", "unix: needs a socket path"),
    ("bogus:anything", "unknown migration protocol: bogus"),
    ("no-protocol", "no protocol before ':'"),
    ("rdma:127.0.0.1:4444", "the rdma: protocol is not supported here"),
]


@pytest.fixture
def blocks() -> Iterator[list[RAMBlock]]:
    made = [RAMBlock.anonymous("pc.ram", 4 * MiB)]
    yield made
    for block in made:
        block.close()


@pytest.fixture
def nothing_starts() -> Iterator[None]:
    """The test must leave the thread list exactly as it found it."""
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) == before


def _endpoint(side: str, blocks: list[RAMBlock], **settings: Any) -> Any:
    cls = MigrationSource if side == "source" else MigrationDestination
    return cls(blocks, **settings)


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize(("values", "message"), BAD_PARAMETERS)
def test_bad_parameters_refused(
    blocks: list[RAMBlock], nothing_starts: None, side: str, values: dict, message: str
) -> None:
    with pytest.raises(MigrationConfigError, match="^" + _literal(message)):
        _endpoint(side, blocks, parameters=values)
    endpoint = _endpoint(side, blocks, capabilities={"multifd": True})
    before = endpoint.settings.query_parameters()
    with pytest.raises(MigrationConfigError, match="^" + _literal(message)):
        endpoint.set_parameters(values)
    assert endpoint.settings.query_parameters() == before
    assert endpoint.query() == {}


def test_throttle_floor_above_its_ceiling_refused(blocks: list[RAMBlock]) -> None:
    """QEMU checks max-cpu-throttle against cpu-throttle-initial at every set,
    not only when the ceiling is set: a floor raised above it is refused too."""
    source = MigrationSource(blocks, parameters={"max-cpu-throttle": 50})
    message = (
        "Parameter 'max-cpu-throttle' expects an integer in the range of cpu-throttle-initial to 99"
    )
    with pytest.raises(MigrationConfigError, match="^" + _literal(message)):
        source.set_parameters({"cpu-throttle-initial": 60})
    assert source.settings.parameter("cpu-throttle-initial") == 20
    source.set_parameters({"cpu-throttle-initial": 50})
    with pytest.raises(MigrationConfigError, match="^" + _literal(message)):
        MigrationSource(blocks, parameters={"cpu-throttle-initial": 60, "max-cpu-throttle": 50})


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize(("states", "message"), BAD_CAPABILITIES)
def test_bad_capabilities_refused(
    blocks: list[RAMBlock], nothing_starts: None, side: str, states: dict, message: str
) -> None:
    with pytest.raises(MigrationConfigError, match="^" + _literal(message)):
        _endpoint(side, blocks, capabilities=states)
    endpoint = _endpoint(side, blocks)
    before = endpoint.settings.query_capabilities()
    with pytest.raises(MigrationConfigError, match="^" + _literal(message)):
        endpoint.set_capabilities(states)
    # QMP's list form is checked the same way.
    with pytest.raises(MigrationConfigError, match="^" + _literal(message)):
        endpoint.set_capabilities([{"capability": k, "state": v} for k, v in states.items()])
    assert endpoint.settings.query_capabilities() == before
    assert endpoint.query() == {}


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize("uri", MULTIFD_REFUSED)
def test_multifd_refused_on_single_stream_transports(
    blocks: list[RAMBlock], nothing_starts: None, tmp_path: Path, side: str, uri: str
) -> None:
    uri = uri.format(tmp=tmp_path)
    endpoint = _endpoint(side, blocks, capabilities={"multifd": True})
    start = endpoint.migrate if side == "source" else endpoint.incoming
    with pytest.raises(URIError, match="multifd is not supported by current protocol") as refused:
        start(uri)
    _assert_refused(endpoint, side, str(refused.value))
    assert list(tmp_path.iterdir()) == []  # file: created nothing


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize(("uri", "message"), MALFORMED)
def test_malformed_uri_refused(
    blocks: list[RAMBlock], nothing_starts: None, side: str, uri: str, message: str
) -> None:
    endpoint = _endpoint(side, blocks, capabilities={"multifd": True})
    start = endpoint.migrate if side == "source" else endpoint.incoming
    with pytest.raises(URIError, match=_literal(message)) as refused:
        start(uri)
    assert "accepted forms" in str(refused.value) or "not supported" in str(refused.value)
    _assert_refused(endpoint, side, str(refused.value))


def _assert_refused(
    endpoint: MigrationSource | MigrationDestination, side: str, error: str
) -> None:
    """As QEMU's: a source's refused URI is a migration that began and failed,
    and another may start at once; a destination's leaves it as it was."""
    if side == "source":
        assert endpoint.query() == {"status": "failed", "error-desc": error}
        assert endpoint.state.status.value == "failed"
    else:
        assert endpoint.query() == {}


def test_blocks_refused(nothing_starts: None) -> None:
    with pytest.raises(ValueError, match="at least one RAM block"):
        MigrationSource([])
    a, b = RAMBlock.anonymous("same", 4096), RAMBlock.anonymous("same", 8192)
    try:
        for cls in (MigrationSource, MigrationDestination):
            with pytest.raises(ValueError, match="names must be unique"):
                cls([a, b])
    finally:
        a.close()
        b.close()


def test_settings_refused_while_migrating(migration: Callable[..., Migration]) -> None:
    """During a migration capabilities and a new start are refused on both
    ends, and so is a change to a parameter the migration read as it started;
    the others are taken. The running migration goes on."""
    m = migration(parameters={"multifd-channels": 2})
    refused: list[str] = []

    def on_pass(n: int) -> None:
        if n != 2:
            return
        for attempt in (
            lambda: m.source.set_capabilities({"multifd": False}),
            lambda: m.source.migrate(m.uri),
            lambda: m.destination.incoming(m.uri),
            lambda: m.source.set_parameters({"downtime-limit": 400, "multifd-channels": 3}),
            lambda: m.destination.set_parameters({"multifd-channels": 3}),
        ):
            with pytest.raises(MigrationConfigError) as exc:
                attempt()
            refused.append(str(exc.value))
        m.source.set_parameters({"downtime-limit": 350, "multifd-channels": 2})
        m.destination.set_parameters({"downtime-limit": 350, "multifd-channels": 2})

    m.on_pass = on_pass
    m.assert_completed()
    fixed = (
        "Parameter 'multifd-channels' cannot be changed while a migration is in progress: "
        "it takes effect only between migrations"
    )
    assert refused == ["There's a migration process in progress"] * 3 + [fixed] * 2
    assert m.source.settings.parameter("downtime-limit") == 350
    assert m.destination.settings.parameter("downtime-limit") == 350
    # Between migrations every parameter may change again.
    m.source.set_parameters({"multifd-channels": 3})


def test_rate_limit_follows_a_changed_limit_at_once() -> None:
    """max-bandwidth is read at every step: a raised limit is not owed the old
    one's backlog, and no wait is longer than one step."""
    now, queued, limit = [0.0], [0], [1000]
    rate_limit = RateLimit(lambda: limit[0], lambda: queued[0], clock=lambda: now[0])
    queued[0] = 10_000  # 10 s at 1000 bytes/s
    assert rate_limit.delay() == STEP_SECONDS
    now[0] = 5.0
    assert rate_limit.delay() == STEP_SECONDS
    limit[0] = 1 << 20
    assert rate_limit.delay() == 0.0
    queued[0] += 1 << 19
    now[0] = 5.25
    assert rate_limit.delay() == STEP_SECONDS  # 0.25 s ahead of the new limit
    now[0] = 5.45
    assert rate_limit.delay() == pytest.approx(0.05)
    limit[0] = 0
    assert rate_limit.delay() == 0.0


def test_rate_limit_owes_no_time_lost_behind_it() -> None:
    """Queuing that fell behind the limit (the link was slower meanwhile) is
    not made up at full speed: as QEMU forgets each 100 ms window once past,
    at most a step's worth is owed."""
    now, queued = [0.0], [0]
    rate_limit = RateLimit(lambda: 1000, lambda: queued[0], clock=lambda: now[0])
    now[0] = 10.0  # nothing queued for 10 s
    assert rate_limit.delay() == 0.0
    queued[0] = 1000  # a second's worth at once
    assert rate_limit.delay() == STEP_SECONDS
    assert rate_limit.step_bytes() == 100


def test_max_bandwidth_paces_every_window_not_only_the_average(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two waits the source queues no more than one step (100 ms) of
    max-bandwidth allows, as QEMU counts bytes per 100 ms window: 4 MiB looked
    at per step went out at 1 MiB/s as one burst, then nothing for 4 s."""
    limit = 1 * MiB
    m = migration(parameters={"multifd-channels": 2, "max-bandwidth": limit})
    sends: list[int] = []
    send = MultifdSender.send

    def counted(self: MultifdSender, name: str, buffer: memoryview, pages: Any) -> int:
        sends.append(len(pages))
        return send(self, name, buffer, pages)

    monkeypatch.setattr(MultifdSender, "send", counted)
    m.start()
    wait_until(lambda: len(sends) >= 3, what="three steps")
    m.source.cancel()
    assert m.source.query()["status"] == "cancelled"
    assert max(sends) <= limit * STEP_SECONDS // 4096, sends


def test_mismatched_settings_fail_the_migration(migration: Callable[..., Migration]) -> None:
    """Settings each end accepts but that disagree (zstd against none) fail the
    migration with a message naming channel and packet; the source learns it
    over the return path; both ends can then migrate again."""
    m = migration(
        transport="unix",
        capabilities={"return-path": True},
        parameters={"multifd-channels": 2, "multifd-compression": "zstd"},
        dst_parameters={"multifd-compression": "none"},
    )
    src, dst = m.run()
    assert dst["status"] == "failed", dst
    assert re.match(r"channel [01]: packet \d+: ", dst["error-desc"]), dst["error-desc"]
    assert "compression" in dst["error-desc"]
    assert src["status"] == "failed", src
    m.destination.set_parameters({"multifd-compression": "zstd"})
    m.assert_completed()


def _literal(text: str) -> str:
    return re.escape(text)
