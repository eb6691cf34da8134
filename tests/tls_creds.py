"""QEMU-style x509 credentials directories made with trustme, shared by every test
folder that migrates over TLS (tests/ is importable, see tests/conftest.py)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import trustme

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CLIENT_NAME = "source.example"


def make_creds(
    directory: Path,
    *,
    trust: trustme.CA,
    server: trustme.CA | None = None,
    client: trustme.CA | None = None,
    server_names: tuple[str, ...] = SERVER_NAMES,
    client_name: str = CLIENT_NAME,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Path:
    """Fill `directory` (made here) like QEMU's tls-creds-x509 dir: trusting
    `trust`, with a server certificate signed by `server` and a client certificate
    signed by `client` (None: left out), both valid from `not_before` to
    `not_after` (None: trustme's defaults, valid now)."""
    dates = {"not_before": not_before, "not_after": not_after}
    directory.mkdir()
    trust.cert_pem.write_to_path(directory / "ca-cert.pem")
    if server is not None:
        cert = server.issue_cert(*server_names, **dates)
        cert.cert_chain_pems[0].write_to_path(directory / "server-cert.pem")
        cert.private_key_pem.write_to_path(directory / "server-key.pem")
    if client is not None:
        cert = client.issue_cert(client_name, common_name=client_name, **dates)
        cert.cert_chain_pems[0].write_to_path(directory / "client-cert.pem")
        cert.private_key_pem.write_to_path(directory / "client-key.pem")
    return directory
