"""The QMP server with `qemu.qmp`'s QMPClient and raw sockets: greeting, negotiation,
errors by class and message, ids, hostile input, several clients, events, quit, close."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from control_support import TIMEOUT, Served, ask, configure, connect, next_event, run
from qemu.qmp import ExecuteError, QMPClient

from multifd import __version__
from multifd.control import MigrationCommands, QMPServer
from multifd.control import server as server_module
from multifd.memory import RAMBlock
from multifd.migration.source import MigrationSource

COMMANDS = [
    "qmp_capabilities",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "query-migrate",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "query-status",
    "stop",
    "cont",
    "query-version",
    "query-commands",
    "quit",
]


class RawClient:
    """A client that writes bytes of its choosing and reads answers line by line."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode())

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the server closed the connection"
        assert line.endswith(b"\r\n")
        return json.loads(line)

    def ask(self, data: bytes | dict[str, Any]) -> dict[str, Any]:
        self.send(data)
        return self.read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[Callable[[Served], RawClient]]:
    made: list[RawClient] = []

    def make(served: Served) -> RawClient:
        client = RawClient(served.path)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_greeting_negotiation_and_the_command_list(serve: Callable[..., Served]) -> None:
    served = serve("source")

    async def scenario() -> None:
        qmp = await connect(served.path)
        try:
            assert qmp.greeting is not None
            # QEMU's version whose protocol we speak, so clients that check it let us
            # in; the package says who we are.
            assert qmp.greeting._asdict() == {
                "QMP": {
                    "version": {
                        "qemu": {"major": 7, "minor": 2, "micro": 0},
                        "package": f"multifd {__version__}",
                    },
                    "capabilities": [],
                }
            }
            with pytest.raises(ExecuteError) as refused:
                await qmp.execute("qmp_capabilities")
            assert refused.value.error_class == "CommandNotFound"
            assert str(refused.value) == (
                "Capabilities negotiation is already complete, command ignored"
            )
            names = [c["name"] for c in await ask(qmp, "query-commands")]
            assert names == COMMANDS
            assert await qmp.execute("query-version") == qmp.greeting.QMP.version
            assert await qmp.execute("query-status") == {
                "status": "running",
                "running": True,
                "singlestep": False,
            }
            # QEMU's answer before any migration: no status at all.
            assert await qmp.execute("query-migrate") == {}
        finally:
            await qmp.disconnect()

    run(scenario())


def test_commands_wait_for_negotiation(serve: Callable[..., Served]) -> None:
    served = serve("destination")

    async def scenario() -> None:
        qmp = await connect(served.path, negotiate=False)
        try:
            with pytest.raises(ExecuteError) as refused:
                await qmp.execute("query-status")
            assert refused.value.error_class == "CommandNotFound"
            assert (
                str(refused.value) == "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
            with pytest.raises(ExecuteError, match="Capability 'oob' not available"):
                await qmp.execute("qmp_capabilities", {"enable": ["oob"]})
            assert await qmp.execute("qmp_capabilities") == {}
            assert await qmp.execute("query-status") == {
                "status": "inmigrate",
                "running": False,
                "singlestep": False,
            }
        finally:
            await qmp.disconnect()

    run(scenario())


REFUSALS: list[tuple[str, dict[str, Any], str, str]] = [
    ("warp-speed", {}, "CommandNotFound", "The command warp-speed has not been found"),
    ("migrate", {}, "GenericError", "Parameter 'uri' is missing"),
    ("migrate", {"uri": 5}, "GenericError", "Invalid parameter type for 'uri', expected: string"),
    (
        "migrate",
        {"uri": "unix:/x", "detach": "yes"},
        "GenericError",
        "Invalid parameter type for 'detach', expected: boolean",
    ),
    ("migrate", {"uri": "unix:/x", "speed": 1}, "GenericError", "Parameter 'speed' is unexpected"),
    (
        "migrate",
        {"uri": "unix:/x", "blk": True},
        "GenericError",
        "Block migration (blk, inc) is not supported: only RAM blocks migrate",
    ),
    (
        "migrate",
        {"uri": "carrier-pigeon:coop"},
        "GenericError",
        "invalid migration URI 'carrier-pigeon:coop': unknown migration protocol",
    ),
    (
        "migrate-incoming",
        {"uri": "unix:/x"},
        "GenericError",
        "For use with '-incoming defer' (this is a source: 'multifd migrate')",
    ),
    (
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "warp", "state": True}]},
        "GenericError",
        "Parameter 'capability' does not accept value 'warp'",
    ),
    (
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "multifd"}]},
        "GenericError",
        "Parameter 'state' is missing",
    ),
    (
        "migrate-set-capabilities",
        {"capabilities": {"multifd": True}},
        "GenericError",
        "Invalid parameter type for 'capabilities', expected: array",
    ),
    (
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "postcopy-ram", "state": True}]},
        "GenericError",
        "Capability 'postcopy-ram' is not supported by this implementation",
    ),
    (
        "migrate-set-parameters",
        {"multifd-channels": 0},
        "GenericError",
        "Parameter 'multifd-channels' expects an integer in the range of 1 to 255",
    ),
    (
        "migrate-set-parameters",
        {"multifd-compression": "lz4"},
        "GenericError",
        "Parameter 'multifd-compression' does not accept value 'lz4'",
    ),
    (
        "migrate-set-parameters",
        {"downtime-limit": "300"},
        "GenericError",
        "Invalid parameter type for 'downtime-limit', expected: integer",
    ),
    ("migrate-set-parameters", {"warp": 9}, "GenericError", "Parameter 'warp' is unexpected"),
    (
        "migrate-set-parameters",
        {"tls-creds": 1},
        "GenericError",
        "Invalid parameter type for 'tls-creds', expected: StrOrNull",
    ),
    (
        "migrate-set-parameters",
        {"xbzrle-cache-size": 4097},
        "GenericError",
        "Parameter 'xbzrle-cache-size' expects a power of two no less than the target page size",
    ),
    ("query-migrate", {"verbose": True}, "GenericError", "Parameter 'verbose' is unexpected"),
]


def test_errors_say_what_was_wrong(serve: Callable[..., Served]) -> None:
    served = serve("source")

    async def scenario() -> None:
        qmp = await connect(served.path)
        try:
            for command, arguments, error_class, message in REFUSALS:
                with pytest.raises(ExecuteError) as refused:
                    await qmp.execute(command, arguments)
                assert refused.value.error_class == error_class, command
                assert str(refused.value).startswith(message), (command, str(refused.value))
            # Nothing refused changed anything.
            assert await qmp.execute("query-migrate-parameters") == (
                served.endpoint.settings.query_parameters()
            )
            assert served.endpoint.settings.parameter("multifd-channels") == 2
        finally:
            await qmp.disconnect()

    run(scenario())


def test_settings_round_trip(serve: Callable[..., Served]) -> None:
    served = serve("destination")

    async def scenario() -> None:
        qmp = await connect(served.path)
        try:
            await configure(qmp, multifd_channels=5, multifd_compression="zstd", max_bandwidth=1)
            capabilities = await ask(qmp, "query-migrate-capabilities")
            assert {"capability": "multifd", "state": True} in capabilities
            assert {"capability": "events", "state": True} in capabilities
            assert {"capability": "xbzrle", "state": False} in capabilities
            parameters = await ask(qmp, "query-migrate-parameters")
            assert parameters["multifd-channels"] == 5
            assert parameters["multifd-compression"] == "zstd"
            assert parameters["downtime-limit"] == 300
        finally:
            await qmp.disconnect()

    run(scenario())


# query-migrate-parameters of a fresh QEMU 7.2.22, in the order of its
# MigrationParameters (query-qmp-schema); ours follow.
QEMU_PARAMETERS = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "compress-level": 1,
    "compress-threads": 8,
    "compress-wait-thread": True,
    "decompress-threads": 2,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
    "max-bandwidth": 134217728,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "block-incremental": False,
    "multifd-channels": 2,
    "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-zstd-level": 1,
}
OWN_PARAMETERS = {"x-dirty-tracker": "auto", "x-stream-profile": "7.2", "x-io-timeout": 30}
# What QEMU 7.2 took and then reported (its extremes, and null for StrOrNull).
QEMU_ACCEPTS = {
    "announce-initial": 100000,
    "announce-rounds": 0,
    "announce-step": 10000,
    "compress-level": 9,
    "compress-threads": 255,
    "compress-wait-thread": False,
    "decompress-threads": 1,
    "cpu-throttle-tailslow": True,
    "xbzrle-cache-size": 1 << 63,
    "max-postcopy-bandwidth": 2**64 - 1,
    "block-incremental": True,
    "x-checkpoint-delay": 2**32 - 1,
    "block-bitmap-mapping": [
        {
            "node-name": "disk0",
            "alias": "x-y.z_",
            "bitmaps": [{"name": "b", "alias": "1", "transform": {"persistent": True}}],
        }
    ],
}


@pytest.mark.parametrize("kind", ["source", "destination"])
def test_every_qemu_parameter(serve: Callable[..., Served], kind: str) -> None:
    """All of QEMU 7.2's parameters, with its defaults and ranges: those whose
    feature is not implemented are kept and reported all the same."""
    served = serve(kind)

    async def scenario() -> None:
        qmp = await connect(served.path)
        try:
            parameters = await ask(qmp, "query-migrate-parameters")
            assert list(parameters.items()) == [*QEMU_PARAMETERS.items(), *OWN_PARAMETERS.items()]
            for name, value in QEMU_PARAMETERS.items():
                assert await qmp.execute("migrate-set-parameters", {name: value}) == {}, name
            assert await qmp.execute("migrate-set-parameters", QEMU_ACCEPTS) == {}
            parameters = await ask(qmp, "query-migrate-parameters")
            assert {n: parameters[n] for n in QEMU_ACCEPTS} == QEMU_ACCEPTS
            # QEMU lists block-bitmap-mapping once it has been set, last of its own.
            assert list(parameters)[len(QEMU_PARAMETERS)] == "block-bitmap-mapping"

            await configure(qmp, tls_creds="tls0", tls_hostname="h", tls_authz="a")
            nulls = {"tls-creds": None, "tls-hostname": None, "tls-authz": None}
            assert await qmp.execute("migrate-set-parameters", nulls) == {}
            parameters = await ask(qmp, "query-migrate-parameters")
            assert {n: parameters[n] for n in nulls} == dict.fromkeys(nulls, "")
        finally:
            await qmp.disconnect()

    run(scenario())


def test_raw_input_errors_keep_the_connection(
    serve: Callable[..., Served], raw: Callable[[Served], RawClient]
) -> None:
    client = raw(serve("source", max_message=4096))
    assert client.greeting["QMP"]["capabilities"] == []
    assert client.ask({"execute": "qmp_capabilities", "id": 1}) == {"return": {}, "id": 1}

    def error(desc: str) -> dict[str, Any]:
        return {"error": {"class": "GenericError", "desc": desc}}

    answer = client.ask(b'{"execute": "query-status",, }')
    assert answer["error"]["class"] == "GenericError"
    assert answer["error"]["desc"].startswith("JSON parse error, ")
    assert client.ask(b"[1, 2]") == error("QMP input must be a JSON object")
    assert client.ask(b"42 ") == error("QMP input must be a JSON object")
    assert client.ask({"id": "x"}) == {**error("QMP input lacks member 'execute'"), "id": "x"}
    assert client.ask({"execute": 7}) == error("QMP input member 'execute' must be a string")
    assert client.ask({"execute": "quit", "arguments": []}) == error(
        "QMP input member 'arguments' must be an object"
    )
    assert client.ask({"exec-oob": "query-status"}) == error(
        "QMP input member 'exec-oob' is unexpected"
    )
    assert client.ask(b'{"execute": "query-status", "execute": "quit"}') == error(
        "JSON parse error, duplicate key 'execute'"
    )
    # A byte QEMU's lexer refuses drops the message; what follows it up to the next
    # structural character is skipped, and that character read as QEMU reads it.
    assert client.ask(b'{"execute": "query-status", "id": NaN}') == error(
        "JSON parse error, stray 'N'"
    )
    assert client.read()["error"]["desc"].startswith("JSON parse error, ")  # the lone }
    assert client.ask(b'{"execute": "\xff"}') == error("JSON parse error, stray '\"\ufffd'")
    assert client.read()["error"]["desc"].startswith("JSON parse error, ")
    big = b'{"execute": "query-status", "arguments": {"x": "' + b"y" * 10_000 + b'"}}'
    assert client.ask(big) == error(
        f"JSON parse error, message of {len(big)} bytes exceeds the limit of 4096 bytes"
    )
    # The id comes back as it was sent, whatever JSON it is.
    request_id = {"n": [1, 2.5, None, "é"]}
    assert client.ask({"execute": "query-status", "id": request_id}) == {
        "return": {"status": "running", "running": True, "singlestep": False},
        "id": request_id,
    }
    # Two requests in one write, and one cut across writes, answered in order.
    client.send(b'{"execute": "query-migrate", "id": 1}{"execute": "query-status", "id": 2}{"ex')
    assert client.read()["id"] == 1
    assert client.read()["id"] == 2
    client.send(b'ecute": "query-commands", "id": 3}\r\n')
    assert client.read()["id"] == 3


@pytest.mark.parametrize(
    ("reset", "desc"),
    [(b"\x01", "JSON parse error, stray '\x01'"), (b"\xff", "JSON parse error, stray '\ufffd'")],
)
def test_a_byte_no_json_holds_resets_a_half_sent_request(
    serve: Callable[..., Served], raw: Callable[[Served], RawClient], reset: bytes, desc: str
) -> None:
    # The QMP spec's way to get the parser back into a known state, answered as
    # QEMU 7.2 answers it: one error without id, then the next request as usual.
    client = raw(serve("source"))
    assert client.ask({"execute": "qmp_capabilities"}) == {"return": {}}
    client.send(b'{"execute": "query-status", "arguments": {')
    assert client.ask(reset) == {"error": {"class": "GenericError", "desc": desc}}
    assert client.ask({"execute": "query-status", "id": 42}) == {
        "return": {"status": "running", "running": True, "singlestep": False},
        "id": 42,
    }


def test_single_quoted_strings_are_read_as_qemu_reads_them(
    serve: Callable[..., Served], raw: Callable[[Served], RawClient]
) -> None:
    client = raw(serve("source"))
    assert client.ask(b"{'execute': 'qmp_capabilities'}") == {"return": {}}
    assert client.ask(b"""{'execute': 'query-status', 'id': 'it\\'s "x" {'}""") == {
        "return": {"status": "running", "running": True, "singlestep": False},
        "id": 'it\'s "x" {',
    }
    assert client.ask(
        b"""{"execute": 'migrate-set-parameters',"""
        b""" 'arguments': {'tls-hostname': 'h\\'1'}}"""
    ) == {"return": {}}
    assert client.ask(b"{'execute': 'query-migrate-parameters'}")["return"]["tls-hostname"] == (
        "h'1"
    )


def test_several_clients_get_every_event_once_negotiated(
    serve: Callable[..., Served], raw: Callable[[Served], RawClient]
) -> None:
    served = serve("source")
    waiting = raw(served)  # connected, but still negotiating: no events for it

    async def scenario() -> None:
        first = await connect(served.path, name="first")
        second = await connect(served.path, name="second")
        try:
            served.server.emit("MIGRATION", {"status": "setup"})
            for qmp in (first, second):
                message = await next_event(qmp, "MIGRATION")
                assert message["data"] == {"status": "setup"}
                stamp = message["timestamp"]
                assert set(stamp) == {"seconds", "microseconds"}
                assert stamp["seconds"] > 1_600_000_000
                assert 0 <= stamp["microseconds"] < 1_000_000
        finally:
            await first.disconnect()
            await second.disconnect()

    run(scenario())
    # Its next message is the answer, not the event it was not ready for.
    assert waiting.ask({"execute": "qmp_capabilities"}) == {"return": {}}


def test_a_client_that_stops_reading_is_dropped_alone(
    serve: Callable[..., Served], raw: Callable[[Served], RawClient], monkeypatch: Any
) -> None:
    monkeypatch.setattr(server_module, "MAX_OUTPUT", 64 << 10)
    served = serve("source")
    sleeper = raw(served)
    sleeper.ask({"execute": "qmp_capabilities"})

    async def scenario() -> None:
        qmp = await connect(served.path)
        try:
            # Enough events to fill the kernel's buffers and then our cap; the
            # reading client takes each batch whole before the next one comes.
            for batch in range(60):
                for n in range(100):
                    served.server.emit("MIGRATION_PASS", {"pass": batch * 100 + n})
                while (await next_event(qmp, "MIGRATION_PASS"))["data"]["pass"] != batch * 100 + 99:
                    pass
            assert await qmp.execute("query-status") == {
                "status": "running",
                "running": True,
                "singlestep": False,
            }
        finally:
            await qmp.disconnect()

    run(scenario())
    # The sleeper finds what the kernel had buffered, then the end.
    sleeper.sock.settimeout(TIMEOUT)
    while sleeper.sock.recv(1 << 20):
        pass


def test_clients_that_vanish_do_not_disturb_a_migration(
    serve: Callable[..., Served], raw: Callable[[Served], RawClient], sock_dir: Path
) -> None:
    source, destination = serve("source"), serve("destination")

    async def scenario() -> None:
        watcher = await connect(source.path)
        try:
            await configure(watcher, max_bandwidth=8 << 20)
            destination.destination.set_capabilities({"multifd": True})
            uri = f"unix:{sock_dir / 'migration.sock'}"
            destination.destination.incoming(uri)
            await watcher.execute("migrate", {"uri": uri})
            assert (await next_event(watcher, "MIGRATION"))["data"]["status"] == "setup"
            # Half a message, garbage, a vanishing negotiated client, mid-migration.
            for payload in (b'{"execute": "migrate_ca', b"\x00\xff{{{", b""):
                client = raw(source)
                client.ask({"execute": "qmp_capabilities"})
                if payload:
                    client.send(payload)
                client.sock.shutdown(socket.SHUT_RDWR)
                client.close()
            statuses: list[str] = []
            while not statuses or statuses[-1] != "completed":
                statuses.append((await next_event(watcher, "MIGRATION"))["data"]["status"])
            assert statuses == ["active", "completed"]
        finally:
            await watcher.disconnect()

    run(scenario())
    destination.endpoint.wait(TIMEOUT)
    assert destination.endpoint.query()["status"] == "completed"
    assert destination.block.sha256() == source.block.sha256()


def test_quit_announces_shutdown_then_answers(
    serve: Callable[..., Served], raw: Callable[[Served], RawClient]
) -> None:
    served = serve("destination")
    watcher = raw(served)
    assert watcher.ask({"execute": "qmp_capabilities"}) == {"return": {}}
    client = raw(served)
    assert client.ask({"execute": "qmp_capabilities"}) == {"return": {}}
    client.send({"execute": "quit", "id": 1})
    # As QEMU 7.2: the event to every client first, then the answer to quit.
    shutdown = client.read()
    assert shutdown["event"] == "SHUTDOWN"
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert client.read() == {"return": {}, "id": 1}
    assert watcher.read()["event"] == "SHUTDOWN"
    assert served.server.quit_requested.wait(TIMEOUT)


def test_qemu_clients_take_quit(serve: Callable[..., Served]) -> None:
    served = serve("destination")

    async def scenario() -> None:
        qmp = await connect(served.path)
        try:
            assert await qmp.execute("quit") == {}
            shutdown = await next_event(qmp, "SHUTDOWN")
            assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        finally:
            await qmp.disconnect()

    run(scenario())
    assert served.server.quit_requested.wait(TIMEOUT)


@pytest.mark.parametrize("address", ["unix", "tcp:127.0.0.1:0"])
def test_close_joins_everything_and_frees_the_address(address: str, sock_dir: Path) -> None:
    address = f"unix:{sock_dir / 'q.sock'}" if address == "unix" else address
    block = RAMBlock.anonymous("pc.ram", 1 << 16)
    endpoint = MigrationSource([block])
    server = QMPServer(address, MigrationCommands(endpoint))
    bound = server.start()
    threads = {t.name for t in threading.enumerate()}
    assert {"qmp-io", "qmp-commands"} <= threads

    async def scenario() -> None:
        qmp = await connect_to(bound)
        assert await qmp.execute("query-status")
        await asyncio.get_running_loop().run_in_executor(None, server.close)
        # The server hung up on us: the client reports the end of its stream.
        with pytest.raises(EOFError):
            await qmp.disconnect()

    try:
        run(scenario())
    finally:
        server.close()
        block.close()
    if bound.startswith("unix:"):
        assert not Path(bound.removeprefix("unix:")).exists()
    else:
        # The port is free at once for the next server.
        again = QMPServer(bound, MigrationCommands(endpoint))
        assert again.start() == bound
        again.close()


async def connect_to(address: str) -> QMPClient:
    qmp = QMPClient("test")
    if address.startswith("unix:"):
        await qmp.connect(address.removeprefix("unix:"))
    else:
        host, port = address.removeprefix("tcp:").rsplit(":", 1)
        await qmp.connect((host, int(port)))
    return qmp
