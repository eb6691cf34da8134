"""The QMP socket: an I/O thread serves every client with selectors, a command thread
runs their requests one at a time in arrival order, as QEMU's monitor does."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ..channels import TcpURI, UnixURI, URIError, parse_uri
from ..channels.transport import listen_socket, unlink_socket
from .framing import DEFAULT_MAX_MESSAGE, Frame, JsonSplitter
from .protocol import CommandHandler, Session, encode, event, greeting

log = logging.getLogger(__name__)

SocketAddress = TcpURI | UnixURI

MAX_CLIENTS = 16
# QEMU's QMP_REQ_QUEUE_LEN_MAX: a client with this many requests waiting is
# not read from until one is answered, so nobody can queue without bound.
MAX_QUEUED = 8
MAX_OUTPUT = 16 << 20  # bytes waiting for a client that stopped reading: it is dropped
FLUSH_TIMEOUT = 1.0  # seconds close() gives clients to take their last answers
RECV_SIZE = 1 << 16
_SCHEMES = ("tcp", "unix", "fd", "exec", "file", "vsock", "rdma")


QMP_FORMS = "unix:PATH, tcp:HOST:PORT, or a path meaning unix:PATH"


class QMPAddressError(ValueError):
    """A QMP address that cannot be used; the message shows the forms it takes."""

    def __init__(self, address: str, problem: str) -> None:
        self.address = address
        self.problem = problem
        super().__init__(
            f"invalid QMP address {address!r}: {problem} (accepted forms: {QMP_FORMS})"
        )


def parse_qmp_address(text: str) -> SocketAddress:
    """`unix:PATH`, `tcp:HOST:PORT`, or a bare path meaning `unix:PATH`."""
    uri = text if text.partition(":")[0] in _SCHEMES else f"unix:{text}"
    scheme = uri.partition(":")[0]
    if scheme not in ("tcp", "unix"):
        raise QMPAddressError(text, f"a QMP socket is not served on {scheme}:")
    try:
        target = parse_uri(uri)
    except URIError as exc:
        raise QMPAddressError(text, exc.problem) from None
    assert isinstance(target, TcpURI | UnixURI)
    return target


@dataclass(eq=False)
class _Client:
    number: int
    sock: socket.socket
    splitter: JsonSplitter
    session: Session = field(default_factory=Session)
    out: bytearray = field(default_factory=bytearray)  # guarded by the server's lock
    queued: int = 0  # requests read but not yet answered; guarded by the lock
    closed: bool = False
    overflow: bool = False
    events: int = 0  # what the selector watches for; I/O thread only


class QMPServer:
    """Serves `commands` over QMP on `address` to several clients at once.

    `start()` listens and returns the address bound (tcp port 0 picks one).
    Events reach every client that has negotiated. A client's `quit` sets
    `quit_requested` (and calls `on_quit`): the owner then calls `close()`,
    which answers what it can, joins both threads, closes every socket and
    frees the address. Bad input costs the client an error answer, and a
    client that vanishes or stops reading costs only itself.
    """

    def __init__(
        self,
        address: str | SocketAddress,
        commands: CommandHandler,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        on_quit: Callable[[], None] | None = None,
    ) -> None:
        self._target = parse_qmp_address(address) if isinstance(address, str) else address
        self.commands = commands
        self.max_message = max_message
        self.on_quit = on_quit
        self.quit_requested = threading.Event()
        self.address: str | None = None
        self._lock = threading.Lock()
        self._clients: dict[int, _Client] = {}
        self._accepted = 0
        self._requests: queue.Queue[tuple[_Client, Frame] | None] = queue.Queue()
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._unix_identity: tuple[int, int] | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._io_thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._quit_pending = False

    # -- lifetime -----------------------------------------------------------------

    def start(self) -> str:
        listener, bound = listen_socket(self._target, backlog=MAX_CLIENTS)
        listener.setblocking(False)
        if isinstance(bound, UnixURI):
            st = os.stat(bound.path)
            self._unix_identity = (st.st_dev, st.st_ino)
        self._listener = listener
        self.address = str(bound)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self.commands.attach(self.emit, self._client_quit)
        self._worker = threading.Thread(target=self._serve_requests, name="qmp-commands")
        self._io_thread = threading.Thread(target=self._io_loop, name="qmp-io")
        self._worker.start()
        self._io_thread.start()
        return self.address

    def close(self) -> None:
        """Stop serving; every thread is joined and every socket closed on return."""
        if threading.current_thread() is self._worker:
            raise RuntimeError("QMPServer.close() called from a QMP command; use on_quit")
        if self._stopping:
            return
        self._stopping = True
        self.commands.detach()
        if self._worker is not None:
            self._requests.put(None)
            self._worker.join()
        if self._io_thread is not None:
            with self._lock:
                self._wake()
            self._io_thread.join()
        else:
            self._release()

    def __enter__(self) -> QMPServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- events ---------------------------------------------------------------------

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated client; safe from any thread."""
        if self._stopping:
            return
        message = encode(event(name, data))
        with self._lock:
            for client in self._clients.values():
                if client.session.negotiated:
                    self._queue_output(client, message)
            self._wake()

    def _client_quit(self) -> None:
        self._quit_pending = True

    # -- the command thread -----------------------------------------------------------

    def _serve_requests(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            client, frame = item
            answer = None
            # After quit nothing more runs, as in QEMU, which is exiting by then.
            if not (client.closed or self._stopping or self.quit_requested.is_set()):
                answer = encode(client.session.handle(frame, self.commands))
            quitting = self._quit_pending and not self.quit_requested.is_set()
            if quitting:
                # As QEMU 7.2: SHUTDOWN reaches every client before the answer to quit.
                self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            with self._lock:
                client.queued -= 1
                if answer is not None:
                    self._queue_output(client, answer)
                self._wake()
            if quitting:
                self.quit_requested.set()
                if self.on_quit is not None:
                    self.on_quit()

    # -- the I/O thread -------------------------------------------------------------

    def _io_loop(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                for key, mask in self._selector.select():
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wakeups()
                    else:
                        client: _Client = key.data
                        if mask & selectors.EVENT_READ:
                            self._read(client)
                        if mask & selectors.EVENT_WRITE and not client.closed:
                            self._write(client)
                self._update_interest()
        except Exception:
            log.exception("QMP server I/O failed; closing every client")
        finally:
            self._flush()
            self._release()

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("QMP accept failed: %s", exc)
                return
            if len(self._clients) >= MAX_CLIENTS:
                log.warning("QMP: more than %d clients, connection refused", MAX_CLIENTS)
                sock.close()
                continue
            sock.setblocking(False)
            self._accepted += 1
            client = _Client(self._accepted, sock, JsonSplitter(self.max_message))
            with self._lock:
                self._clients[client.number] = client
                client.out += encode(greeting(self.commands.version()))

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # Gone, perhaps mid-message: what it had half sent is forgotten.
            self._drop(client)
            return
        frames = client.splitter.feed(data)
        with self._lock:
            client.queued += len(frames)
        for frame in frames:
            self._requests.put((client, frame))

    def _write(self, client: _Client) -> None:
        with self._lock:
            if not client.out:
                return
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                client.overflow = True  # dropped by _update_interest
                return
            del client.out[:sent]

    def _update_interest(self) -> None:
        assert self._selector is not None
        with self._lock:
            clients = list(self._clients.values())
            wanted = {
                c.number: (selectors.EVENT_READ if c.queued < MAX_QUEUED else 0)
                | (selectors.EVENT_WRITE if c.out else 0)
                for c in clients
            }
        for client in clients:
            if client.overflow:
                self._drop(client)
                continue
            events = wanted[client.number]
            if events == client.events:
                continue
            if client.events == 0:
                self._selector.register(client.sock, events, client)
            elif events == 0:
                self._selector.unregister(client.sock)
            else:
                self._selector.modify(client.sock, events, client)
            client.events = events

    def _drop(self, client: _Client) -> None:
        assert self._selector is not None
        with self._lock:
            client.closed = True
            self._clients.pop(client.number, None)
            client.out.clear()
        if client.events:
            self._selector.unregister(client.sock)
            client.events = 0
        client.sock.close()

    def _drain_wakeups(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass

    def _wake(self) -> None:
        """Under the lock (so the socket cannot be closed meanwhile): make the
        I/O thread look again. A full wake-up socket already says so."""
        if self._wake_w is not None:
            with contextlib.suppress(BlockingIOError):
                self._wake_w.send(b"\0")

    def _queue_output(self, client: _Client, data: bytes) -> None:
        """Under the lock: add to what `client` has to read."""
        if client.closed:
            return
        client.out += data
        if len(client.out) > MAX_OUTPUT:
            client.overflow = True

    def _flush(self) -> None:
        """Give clients their last answers (SHUTDOWN, the one to quit), briefly."""
        deadline = time.monotonic() + FLUSH_TIMEOUT
        with self._lock:
            pending = [(c.sock, bytes(c.out)) for c in self._clients.values() if c.out]
        for sock, data in pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(OSError):
                sock.settimeout(remaining)
                sock.sendall(data)

    def _release(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.closed = True
            client.sock.close()
        if self._selector is not None:
            self._selector.close()
        if self._listener is not None:
            self._listener.close()
            if self._unix_identity is not None and isinstance(self._target, UnixURI):
                unlink_socket(self._target.path, self._unix_identity)
        with self._lock:
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._wake_r = self._wake_w = None
