"""TLS on every channel from QEMU-style credentials made with trustme: matching
certificates work; each wrong one fails with a message saying which check failed."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import time
import uuid as uuid_module
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from multifd.channels import (
    Channel,
    ChannelError,
    ChannelTimeoutError,
    Connections,
    Listener,
    MigrationURI,
    TLSConfig,
    TLSError,
    certificate_subject,
    connect_channels,
)

HEADER = b"QEVM\x00\x00\x00\x03"
UUID = uuid_module.uuid4().bytes
PAGE = 4096

Creds = Callable[..., Path]


def wait_for_refusal(listener: Listener, timeout: float = 10.0) -> str:
    """A bounded wait: the refusal is recorded by the listener's handshake thread."""
    deadline = time.monotonic() + timeout
    while not listener.refusals:
        assert time.monotonic() < deadline, "no refusal recorded"
        time.sleep(0.005)
    (refusal,) = listener.refusals
    return refusal


def try_connect(uri: MigrationURI, tls: TLSConfig | None, channels: int = 0) -> None:
    """Connect and close. Under TLS 1.3 the client finishes its handshake before the
    server has checked the client certificate, so this may succeed or fail with a
    reset: the destination's refusal is where the reason is."""
    with contextlib.suppress(ChannelError):
        connect_channels(uri, header=HEADER, channels=channels, uuid=UUID, tls=tls).close()


@pytest.fixture
def server(creds: Creds, ca: trustme.CA) -> TLSConfig:
    return TLSConfig(creds("server", server=ca))


@pytest.fixture
def client(creds: Creds, ca: trustme.CA) -> TLSConfig:
    return TLSConfig(creds("client", client=ca))


@pytest.mark.parametrize("channels", [0, 3])
def test_tls_round_trip_every_channel_its_own_session(
    listen: Callable[..., Listener], server: TLSConfig, client: TLSConfig, channels: int
) -> None:
    listener = listen("tcp:127.0.0.1:0", channels=channels, uuid=UUID, tls=server)
    source = connect_channels(listener.uri, header=HEADER, channels=channels, uuid=UUID, tls=client)
    with source, listener.wait(10) as destination:
        assert all(c.is_tls for c in source.all + destination.all)
        # Each destination channel did its own handshake and saw the client's certificate.
        for channel in destination.all:
            subject = channel.peer_certificate()
            assert subject is not None
            assert certificate_subject(subject).startswith("CN=source.example,")
        assert destination.main.read_exact(len(HEADER)) == HEADER
        for i, (out, into) in enumerate(zip(source.multifd, destination.multifd, strict=True)):
            out.writev_all([b"hdr", bytes([i]) * PAGE, bytes([i + 1]) * PAGE])
            header, first, second = bytearray(3), bytearray(PAGE), bytearray(PAGE)
            assert into.readv_into([header, first, second]) == 3 + 2 * PAGE
            assert (header, first, second) == (b"hdr", bytes([i]) * PAGE, bytes([i + 1]) * PAGE)
    assert listener.refusals == []


def test_tls_over_unix_with_tls_hostname(
    listen: Callable[..., Listener], server: TLSConfig, creds: Creds, ca: trustme.CA, unix_path: str
) -> None:
    listener = listen(f"unix:{unix_path}", channels=2, uuid=UUID, tls=server)
    client = TLSConfig(creds("client", client=ca), hostname="localhost")
    source = connect_channels(listener.uri, header=HEADER, channels=2, uuid=UUID, tls=client)
    with source, listener.wait(10) as destination:
        assert destination.main.read_exact(len(HEADER)) == HEADER


def test_server_certificate_from_another_ca(
    listen: Callable[..., Listener], creds: Creds, other_ca: trustme.CA, client: TLSConfig
) -> None:
    server = TLSConfig(creds("server", server=other_ca, trust=other_ca))
    listener = listen("tcp:127.0.0.1:0", channels=2, uuid=UUID, tls=server)
    with pytest.raises(TLSError) as info:
        connect_channels(listener.uri, header=HEADER, channels=2, uuid=UUID, tls=client)
    assert str(info.value).startswith(
        "main channel: TLS handshake failed: unknown CA: the destination's certificate is "
        f"not signed by the CA in {client.creds / 'ca-cert.pem'}"
    )
    assert wait_for_refusal(listener).endswith(
        "TLS handshake failed: unknown CA: the source does not trust the CA that signed "
        "our certificate"
    )


def test_client_certificate_from_another_ca(
    listen: Callable[..., Listener],
    server: TLSConfig,
    creds: Creds,
    other_ca: trustme.CA,
) -> None:
    listener = listen("tcp:127.0.0.1:0", tls=server)
    try_connect(listener.uri, TLSConfig(creds("client", client=other_ca)))
    assert wait_for_refusal(listener).endswith(
        "TLS handshake failed: unknown CA: the source's certificate is not signed by the CA "
        f"in {server.creds / 'ca-cert.pem'} (unable to get local issuer certificate)"
    )


def test_wrong_host_name(
    listen: Callable[..., Listener], creds: Creds, ca: trustme.CA, client: TLSConfig
) -> None:
    server = TLSConfig(creds("server", server=ca, server_names=("dst.example",)))
    listener = listen("tcp:127.0.0.1:0", tls=server)
    with pytest.raises(TLSError) as info:
        connect_channels(listener.uri, header=HEADER, tls=client)
    assert str(info.value).startswith(
        "main channel: TLS handshake failed: hostname mismatch: the destination's "
        "certificate is not valid for '127.0.0.1'"
    )
    assert "set tls-hostname" in str(info.value)
    assert "rejected our certificate" in wait_for_refusal(listener)


def test_tls_hostname_overrides_the_uri_host(
    listen: Callable[..., Listener], creds: Creds, ca: trustme.CA
) -> None:
    server = TLSConfig(creds("server", server=ca, server_names=("dst.example",)))
    listener = listen("tcp:127.0.0.1:0", tls=server)
    wrong = TLSConfig(creds("client", client=ca), hostname="other.example")
    with pytest.raises(TLSError, match=r"hostname mismatch: .* not valid for 'other\.example'"):
        connect_channels(listener.uri, header=HEADER, tls=wrong)
    right = TLSConfig(wrong.creds, hostname="dst.example")
    with connect_channels(listener.uri, header=HEADER, tls=right), listener.wait(10) as dest:
        assert dest.main.read_exact(8) == HEADER


def test_missing_client_certificate(
    listen: Callable[..., Listener], server: TLSConfig, creds: Creds
) -> None:
    listener = listen("tcp:127.0.0.1:0", tls=server)
    try_connect(listener.uri, TLSConfig(creds("client")))  # ca-cert.pem only
    assert wait_for_refusal(listener).endswith(
        "TLS handshake failed: client certificate missing: the source sent none (its "
        "tls-creds directory needs client-cert.pem and client-key.pem)"
    )


@pytest.mark.parametrize(
    ("signer", "why"),
    [
        ("other", "unknown CA: the destination does not trust the CA that signed our certificate"),
        (
            None,
            "client certificate missing: the destination requires one "
            "(TLSV13_ALERT_CERTIFICATE_REQUIRED)",
        ),
    ],
)
def test_destination_refusing_our_certificate_after_our_handshake(
    listen: Callable[..., Listener],
    server: TLSConfig,
    creds: Creds,
    other_ca: trustme.CA,
    signer: str | None,
    why: str,
) -> None:
    """Under TLS 1.3 the source's handshake ends before the destination has
    checked the source's certificate: the refusal is an alert the source finds
    when a write fails, and the write's error says what the alert says."""
    client = TLSConfig(creds("client", client=other_ca if signer else None))
    listener = listen("tcp:127.0.0.1:0", tls=server)
    with (
        pytest.raises(ChannelError) as info,
        connect_channels(listener.uri, header=HEADER, tls=client) as source,
    ):
        wait_for_refusal(listener)
        for _ in range(64):
            source.main.write_all(bytes(PAGE))
    assert re.fullmatch(
        r"main channel: write failed at stream offset 0x[0-9a-f]+: the destination "
        r"refused our certificate after the TLS handshake: " + re.escape(why),
        str(info.value),
    ), str(info.value)


@pytest.mark.parametrize(
    ("valid", "message"),
    [
        ((-10, -1), r"has expired \(notAfter \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} GMT\)"),
        ((1, 10), r"is not yet valid \(notBefore \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} GMT\)"),
    ],
)
@pytest.mark.parametrize("side", ["server", "client"])
def test_own_certificate_outside_its_dates_refused_when_loaded(
    creds: Creds, ca: trustme.CA, side: str, valid: tuple[int, int], message: str
) -> None:
    now = datetime.now(UTC)
    directory = creds(
        side,
        **{side: ca},
        not_before=now + timedelta(days=valid[0]),
        not_after=now + timedelta(days=valid[1]),
    )
    config = TLSConfig(directory)
    load = config.server_context if side == "server" else config.client_context
    with pytest.raises(TLSError) as info:
        load()
    assert re.fullmatch(
        f"tls-creds: {re.escape(str(directory / f'{side}-cert.pem'))} {message}", str(info.value)
    ), str(info.value)


def test_certificate_expired_since_it_was_loaded(
    listen: Callable[..., Listener], creds: Creds, ca: trustme.CA, client: TLSConfig
) -> None:
    """A listener outlives its certificate: the source's alert is named."""
    now = datetime.now(UTC)
    server = TLSConfig(creds("server", server=ca, not_after=now + timedelta(seconds=1)))
    listener = listen("tcp:127.0.0.1:0", tls=server)
    time.sleep(max(0.0, (now + timedelta(seconds=2.1) - datetime.now(UTC)).total_seconds()))
    with pytest.raises(
        TLSError, match="the destination's certificate was refused: certificate has expired"
    ):
        connect_channels(listener.uri, header=HEADER, tls=client)
    assert wait_for_refusal(listener).endswith(
        "TLS handshake failed: the source refused our certificate "
        f"{server.creds / 'server-cert.pem'} as expired (SSLV3_ALERT_CERTIFICATE_EXPIRED: "
        "check its notAfter and both hosts' clocks)"
    )


@pytest.mark.parametrize("allowed", [True, False])
def test_tls_authz(
    listen: Callable[..., Listener], creds: Creds, ca: trustme.CA, client: TLSConfig, allowed: bool
) -> None:
    subject = certificate_subject(
        {"subject": ((("organizationName", "x"),), (("commonName", "y"),))}
    )
    assert subject == "CN=y,O=x"
    # The subject trustme gives the client: learn it from a first, unrestricted session.
    probe = listen("tcp:127.0.0.1:0", tls=TLSConfig(creds("probe", server=ca)))
    with connect_channels(probe.uri, header=HEADER, tls=client), probe.wait(10) as seen:
        peer = seen.main.peer_certificate()
        assert peer is not None
        actual = certificate_subject(peer)
    authz = (actual,) if allowed else ("CN=someone.else", "CN=source.example")
    server = TLSConfig(creds("server", server=ca), authz=authz)
    listener = listen("tcp:127.0.0.1:0", channels=1, uuid=UUID, tls=server)
    if allowed:
        source = connect_channels(listener.uri, header=HEADER, channels=1, uuid=UUID, tls=client)
        with source, listener.wait(10):
            pass
        assert listener.refusals == []
    else:
        try_connect(listener.uri, client)
        assert wait_for_refusal(listener).endswith(
            f"TLS: client certificate subject {actual!r} is not authorized by tls-authz "
            "('CN=someone.else', 'CN=source.example')"
        )


def test_plain_source_to_tls_destination(
    listen: Callable[..., Listener], server: TLSConfig
) -> None:
    listener = listen("tcp:127.0.0.1:0", tls=server)
    try_connect(listener.uri, None)
    refusal = wait_for_refusal(listener)
    assert "TLS handshake failed: the source does not speak TLS" in refusal


def test_tls_source_to_plain_destination(
    listen: Callable[..., Listener], client: TLSConfig
) -> None:
    listener = listen("tcp:127.0.0.1:0")
    with pytest.raises(ChannelError) as info:
        connect_channels(listener.uri, header=HEADER, tls=client)
    assert str(info.value) == (
        "main channel: TLS handshake failed: the destination closed the connection during "
        "the TLS handshake (is tls-creds set on the destination?)"
    )
    assert wait_for_refusal(listener).endswith(
        "this is a TLS handshake: set tls-creds on this side too"
    )


def test_tls_handshake_timeout(
    listen: Callable[..., Listener], server: TLSConfig, raw_connect: Callable[..., socket.socket]
) -> None:
    listener = listen("tcp:127.0.0.1:0", tls=server, handshake_timeout=0.2)
    silent = raw_connect(listener.uri)
    assert silent.recv(1) == b""
    assert listener.refusals[0].endswith(
        ": TLS handshake not received within the handshake timeout (0.2 s); ignoring"
    )


@pytest.mark.parametrize(
    ("present", "message"),
    [
        ([], "ca-cert.pem is missing: the destination (server) needs the CA certificate"),
        (["ca-cert.pem"], "server-cert.pem is missing: the destination (server) needs"),
    ],
)
def test_missing_server_credentials_refused_before_listening(
    tmp_path: Path, server: TLSConfig, present: list[str], message: str
) -> None:
    for name in present:
        (tmp_path / name).write_bytes((server.creds / name).read_bytes())
    with pytest.raises(TLSError, match=re.escape(message)):
        Listener("tcp:127.0.0.1:0", tls=TLSConfig(tmp_path))


def test_subject_escaping() -> None:
    cert = {"subject": ((("organizationName", "A, B+C"),), (("commonName", " lead#"),))}
    assert certificate_subject(cert) == "CN=\\ lead#,O=A\\, B\\+C"


def test_channel_reports_no_subject_without_tls() -> None:
    a, b = socket.socketpair()
    with Channel(a, "main channel") as channel:
        assert channel.peer_certificate() is None and not channel.is_tls
    b.close()


def test_tls_config_accepts_strings(tmp_path: Path) -> None:
    config = TLSConfig(str(tmp_path), authz=["CN=a"])  # type: ignore[arg-type]
    assert config.creds == tmp_path and config.authz == ("CN=a",)


def test_close_ends_a_pending_tls_handshake_at_once(
    listen: Callable[..., Listener], server: TLSConfig, raw_connect: Callable[..., socket.socket]
) -> None:
    """A peer that starts a TLS record and stalls: close() does not wait the 60 s."""
    listener = listen("tcp:127.0.0.1:0", tls=server, handshake_timeout=60)
    stalled = raw_connect(listener.uri)
    stalled.sendall(b"\x16\x03\x01\x00\xff")  # a ClientHello record header, no body
    listener.close()
    with contextlib.suppress(ConnectionResetError):
        assert stalled.recv(1) == b""
    assert listener.refusals == []


# ---- one session, a reading thread and a writing thread (return-path) ----------


class OverlapProbe:
    """Stands in for an SSLSocket's SSL object and records how many of its calls
    ran at the same moment: OpenSSL allows one at a time on one session."""

    def __init__(self, sslobj: Any) -> None:
        self._sslobj = sslobj
        self._lock = threading.Lock()
        self._inside = 0
        self.most_at_once = 0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._sslobj, name)
        if name not in ("read", "write", "pending", "shutdown"):
            return target

        def call(*args: Any) -> Any:
            with self._lock:
                self._inside += 1
                self.calls += 1
                self.most_at_once = max(self.most_at_once, self._inside)
            try:
                return target(*args)
            finally:
                with self._lock:
                    self._inside -= 1

        return call


def tls_pair(
    listen: Callable[..., Listener], server: TLSConfig, client: TLSConfig
) -> tuple[Connections, Connections]:
    listener = listen("tcp:127.0.0.1:0", tls=server)
    source = connect_channels(listener.uri, header=HEADER, tls=client)
    destination = listener.wait(10)
    assert destination.main.read_exact(len(HEADER)) == HEADER
    return source, destination


def probe(channel: Channel) -> OverlapProbe:
    sock = channel._sock
    assert isinstance(sock, ssl.SSLSocket)
    watcher = OverlapProbe(sock._sslobj)
    sock._sslobj = watcher  # type: ignore[assignment]
    return watcher


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_reader_and_a_writer_share_one_tls_session(
    listen: Callable[..., Listener],
    server: TLSConfig,
    client: TLSConfig,
    background: Callable[..., Any],
    timeout: float | None,
) -> None:
    """The source's return-path thread waits to read the main channel while the
    migration thread writes megabytes into it; the destination answers at the end.
    No SSL call overlaps another, and waiting to read never holds up a write."""
    source, destination = tls_pair(listen, server, client)
    with source, destination:
        source.main.timeout = destination.main.timeout = timeout
        watched = probe(source.main)
        reader = background(source.main.read_exact, 5)  # blocked until the answer
        payload = bytes(range(256)) * 4096  # 1 MiB per write, more than the socket holds
        drained = background(destination.main.read_exact, 8 * len(payload))
        for _ in range(8):
            source.main.write_all(payload)
        assert drained.result() == payload * 8
        destination.main.write_all(b"SHUT!")
        assert reader.result() == b"SHUT!"
        assert watched.calls > 8
        assert watched.most_at_once == 1


def test_a_tls_read_and_write_time_out_on_their_own(
    listen: Callable[..., Listener], server: TLSConfig, client: TLSConfig
) -> None:
    source, destination = tls_pair(listen, server, client)
    with source, destination:
        source.main.timeout = 0.2
        with pytest.raises(ChannelTimeoutError, match=r"main channel: no data for 0\.2 s"):
            source.main.read_exact(1)
        # The destination reads nothing: the socket buffers fill, then the write waits.
        with pytest.raises(ChannelTimeoutError, match=r"main channel: could not write for 0\.2 s"):
            for _ in range(256):
                source.main.write_all(bytes(1 << 20))


def test_shutdown_ends_a_blocked_tls_read_and_write(
    listen: Callable[..., Listener],
    server: TLSConfig,
    client: TLSConfig,
    background: Callable[..., Any],
) -> None:
    """No timeout, a peer that neither writes nor reads: shutdown() from a third
    thread ends both waits at once."""
    source, destination = tls_pair(listen, server, client)
    with source, destination:
        reader = background(source.main.read_exact, 1)

        def write_forever() -> None:
            while True:
                source.main.write_all(bytes(1 << 20))

        writer = background(write_forever)
        time.sleep(0.2)  # both wait: nothing to read, the socket buffers are full
        assert reader.thread.is_alive() and writer.thread.is_alive()
        started = time.monotonic()
        source.main.shutdown()
        with pytest.raises(ChannelError, match="main channel: shut down while reading"):
            reader.result()
        with pytest.raises(ChannelError, match=r"main channel: write failed .*shut down"):
            writer.result()
        assert time.monotonic() - started < 2.0


def test_silent_peers_in_a_tls_handshake_make_room_for_a_source(
    listen: Callable[..., Listener],
    server: TLSConfig,
    client: TLSConfig,
    raw_connect: Callable[..., socket.socket],
) -> None:
    """At the cap the oldest silent TLS handshake ends at once (its thread is
    waiting for a ClientHello), not after the handshake timeout."""
    listener = listen("tcp:127.0.0.1:0", tls=server, handshake_timeout=60, max_handshakes=2)
    silent = [raw_connect(listener.uri) for _ in range(5)]
    for sock in silent[:3]:
        assert sock.recv(1) == b""
    assert len(listener.refusals) == 3
    for sock, refusal in zip(silent, listener.refusals, strict=False):
        assert refusal.startswith(
            f"incoming connection #{silent.index(sock) + 1} from 127.0.0.1:"
            f"{sock.getsockname()[1]}: 2 handshakes pending, the most at once: closed to "
            "make room for a new connection (the oldest silent one, after "
        ), refusal
    with connect_channels(listener.uri, header=HEADER, tls=client), listener.wait(10) as dest:
        assert dest.main.read_exact(len(HEADER)) == HEADER
    assert len(listener.refusals) == 4  # the source's connection made room too
