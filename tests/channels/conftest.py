"""Fixtures for the channels tests: a leak check after every test (threads, file
descriptors, the port), owned background threads, listeners, TLS credentials."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trustme

import leakcheck
from multifd.channels import Listener, MigrationURI, TcpURI, UnixURI
from tls_creds import CLIENT_NAME, SERVER_NAMES, make_creds


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After every test: no thread and no file descriptor it started is left."""
    with leakcheck.no_leaks():
        yield


def assert_address_free(uri: MigrationURI) -> None:
    """A new listener can take the address at once."""
    if isinstance(uri, TcpURI):
        Listener(uri).close()
    elif isinstance(uri, UnixURI):
        assert not os.path.exists(uri.path), f"{uri.path} was not removed"


@pytest.fixture
def listen() -> Iterator[Callable[..., Listener]]:
    """Make listeners; at teardown they are closed and their addresses must be free."""
    made: list[Listener] = []

    def make(uri: str | MigrationURI, **options: Any) -> Listener:
        listener = Listener(uri, **options)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()
    for listener in made:
        assert_address_free(listener.uri)


class Task:
    """A callable running in a thread the test owns; `result()` joins it."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), name="test-task")
        self.thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background task did not finish"
        if self._error is not None:
            raise self._error
        return self._value


@pytest.fixture
def background() -> Iterator[Callable[..., Task]]:
    """Start tasks in threads; every one is joined at teardown."""
    tasks: list[Task] = []

    def start(fn: Callable[..., Any], *args: Any) -> Task:
        task = Task(fn, *args)
        tasks.append(task)
        return task

    yield start
    for task in tasks:
        task.thread.join(10.0)
        assert not task.thread.is_alive(), "background task still running at teardown"


@pytest.fixture
def unix_path(tmp_path: Path) -> str:
    return str(tmp_path / "migrate.sock")


@pytest.fixture
def raw_connect() -> Iterator[Callable[[MigrationURI], socket.socket]]:
    """Plain client sockets to a listener, for tests that play a misbehaving source;
    closed at teardown."""
    made: list[socket.socket] = []

    def connect(uri: MigrationURI) -> socket.socket:
        if isinstance(uri, TcpURI):
            sock = socket.create_connection((uri.host, uri.port), timeout=10)
        else:
            assert isinstance(uri, UnixURI)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(uri.path)
        made.append(sock)
        return sock

    yield connect
    for sock in made:
        sock.close()


# ---- TLS: certificates made with trustme ---------------------------------------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def other_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def creds(tmp_path: Path, ca: trustme.CA) -> Callable[..., Path]:
    """Make QEMU-style x509 credentials directories (see `make` below)."""

    def make(
        name: str,
        *,
        trust: trustme.CA = ca,
        server: trustme.CA | None = None,
        client: trustme.CA | None = None,
        server_names: tuple[str, ...] = SERVER_NAMES,
        client_name: str = CLIENT_NAME,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Path:
        """A directory trusting `trust`, with a server certificate signed by
        `server` and a client certificate signed by `client` (None: left out),
        valid from `not_before` to `not_after` (None: valid now)."""
        return make_creds(
            tmp_path / name,
            trust=trust,
            server=server,
            client=client,
            server_names=server_names,
            client_name=client_name,
            not_before=not_before,
            not_after=not_after,
        )

    return make
