"""TLS for migration channels from a QEMU-style x509 credentials directory
(`tls-creds`), with `tls-hostname` and a `tls-authz` list of client subjects."""

from __future__ import annotations

import errno
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ChannelError, ChannelTimeoutError, TLSError, os_error_text

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

# X509_V_ERR_* codes that mean "this certificate does not chain to our CA".
_UNKNOWN_CA_CODES = {
    2,  # unable to get issuer certificate
    18,  # self-signed certificate
    19,  # self-signed certificate in chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
}
_HOSTNAME_MISMATCH = 62
# A TLS 1.2 renegotiation would let a write read from the socket, under the feet
# of a thread waiting to read (see TLSSession); QEMU never renegotiates.
_NO_RENEGOTIATION = ssl.OP_NO_RENEGOTIATION
_IP_MISMATCH = 64

# RFC 4514 attribute names, as QEMU's authz lists (gnutls) spell subjects.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
}


@dataclass(frozen=True)
class TLSConfig:
    """The `tls-creds`, `tls-hostname` and `tls-authz` parameters.

    `creds` is a directory laid out like QEMU's x509 credentials: `ca-cert.pem`,
    and `server-cert.pem` + `server-key.pem` (destination) or `client-cert.pem` +
    `client-key.pem` (source). `hostname` overrides the host the source checks the
    destination's certificate against. `authz` lists the client certificate
    subjects (RFC 4514, e.g. "CN=src.example,O=Example") the destination accepts;
    empty means any client whose certificate the CA signed.
    """

    creds: Path
    hostname: str = ""
    authz: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "creds", Path(self.creds))
        object.__setattr__(self, "authz", tuple(self.authz))

    def server_context(self) -> ssl.SSLContext:
        """The destination's context: our certificate, and client certificates required."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= _NO_RENEGOTIATION
        self._load(context, SERVER_CERT, SERVER_KEY, required=True)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """The source's context: the destination's certificate and host name checked;
        our certificate sent if the directory has one."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= _NO_RENEGOTIATION
        self._load(context, CLIENT_CERT, CLIENT_KEY, required=False)
        return context

    def _load(self, context: ssl.SSLContext, cert: str, key: str, *, required: bool) -> None:
        ca, cert_path, key_path = (self.creds / n for n in (CA_CERT, cert, key))
        role = "destination (server)" if required else "source (client)"
        if not ca.is_file():
            raise TLSError("tls-creds", f"{ca} is missing: the {role} needs the CA certificate")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TLSError("tls-creds", f"{ca} is not a PEM certificate: {exc}") from None
        if not required and not cert_path.exists() and not key_path.exists():
            return
        for path in (cert_path, key_path):
            if not path.is_file():
                raise TLSError("tls-creds", f"{path} is missing: the {role} needs {cert} and {key}")
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise TLSError(
                "tls-creds", f"{cert_path} and {key_path} are not a matching pair: {exc}"
            ) from None
        _check_dates(cert_path)

    def wrap_client(
        self, context: ssl.SSLContext, sock: socket.socket, host: str, name: str
    ) -> ssl.SSLSocket:
        """A connected socket as the source's end of a TLS session, before the
        handshake. The destination's certificate must match `hostname`, else `host`."""
        server_name = self.hostname or host
        if not server_name:
            raise TLSError(name, "TLS needs tls-hostname: the URI has no host name to check")
        return context.wrap_socket(sock, server_hostname=server_name, do_handshake_on_connect=False)

    def wrap_server(self, context: ssl.SSLContext, sock: socket.socket) -> ssl.SSLSocket:
        """An accepted socket as the destination's end of a TLS session, before the
        handshake."""
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    def handshake(self, tls: ssl.SSLSocket, name: str) -> None:
        """Run the handshake (the socket's timeout applies); on the destination, then
        check `tls-authz`. Raises `TLSError` saying which check failed, or
        `ChannelTimeoutError`. Never closes the socket: the caller owns it, and a
        listener records why before it closes."""
        peer = "the source" if tls.server_side else "the destination"
        try:
            tls.do_handshake()
        except OSError as exc:
            raise _handshake_error(
                name,
                exc,
                peer=peer,
                ca=self.creds / CA_CERT,
                cert=self.creds / (SERVER_CERT if tls.server_side else CLIENT_CERT),
                hostname=tls.server_hostname or "",
            ) from None
        if tls.server_side and self.authz:
            subject = certificate_subject(tls.getpeercert() or {})
            if subject not in self.authz:
                raise TLSError(
                    name,
                    f"TLS: client certificate subject {subject!r} is not authorized "
                    f"by tls-authz ({', '.join(repr(s) for s in self.authz)})",
                )


def _check_dates(cert_path: Path) -> None:
    """Refuse our own certificate outside its validity period, naming the file, as
    QEMU does when it loads the creds: a peer would refuse every connection with an
    alert that names neither the file nor (when not yet valid) the dates."""
    # The ssl module decodes a peer's certificate but offers no public way to read
    # a file's; its own tests use this one. Without it the peer's alert still says
    # why (see describe_ssl_error).
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return
    try:
        decoded = decode(str(cert_path))
        not_before, not_after = decoded["notBefore"], decoded["notAfter"]
        valid = ssl.cert_time_to_seconds(not_before), ssl.cert_time_to_seconds(not_after)
    except (OSError, KeyError, ValueError):
        return  # load_cert_chain accepted it: OpenSSL has the final word
    now = time.time()
    if now > valid[1]:
        raise TLSError("tls-creds", f"{cert_path} has expired (notAfter {not_after})")
    if now < valid[0]:
        raise TLSError("tls-creds", f"{cert_path} is not yet valid (notBefore {not_before})")


def _handshake_error(
    name: str, exc: OSError, *, peer: str, ca: Path, cert: Path, hostname: str = ""
) -> ChannelError:
    if isinstance(exc, TimeoutError):
        return ChannelTimeoutError(
            name, f"TLS handshake: no answer from {peer} in time", errno=errno.ETIMEDOUT
        )
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError):
        # A destination without tls-creds reads our ClientHello as a bad channel
        # magic and hangs up: the EOF is the only answer this side gets.
        hint = " (is tls-creds set on the destination?)" if peer == "the destination" else ""
        detail = f"{peer} closed the connection during the TLS handshake{hint}"
    elif isinstance(exc, ssl.SSLError):
        detail = describe_ssl_error(exc, peer=peer, ca=ca, cert=cert, hostname=hostname)
    else:
        detail = os_error_text(exc)
    return TLSError(name, f"TLS handshake failed: {detail}", errno=exc.errno)


def certificate_subject(cert: dict[str, object]) -> str:
    """A decoded certificate's subject as an RFC 4514 string, most specific first
    ("CN=…,O=…"), the way QEMU's authz lists name clients."""
    rdns = []
    for rdn in reversed(cert.get("subject", ())):  # type: ignore[call-overload]
        rdns.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(rdns)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in '\\,+"<>;=' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


# Alerts by which a peer refuses the certificate we sent.
_REFUSALS_OF_OUR_CERTIFICATE = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV1_ALERT_ACCESS_DENIED",
}


def describe_alert_after_handshake(alert: ssl.SSLError, *, server_side: bool) -> str:
    """What a peer's alert, read once the handshake had ended on our side, says.
    Under TLS 1.3 the source's handshake ends before the destination has checked
    the source's certificate: a refusal arrives as an alert on the first write."""
    peer = "the source" if server_side else "the destination"
    detail = describe_ssl_error(alert, peer=peer)
    if alert.reason in _REFUSALS_OF_OUR_CERTIFICATE:
        return f"{peer} refused our certificate after the TLS handshake: {detail}"
    return f"{peer} ended the TLS session: {detail}"


def describe_ssl_error(
    exc: ssl.SSLError,
    *,
    peer: str = "the peer",
    ca: Path | None = None,
    cert: Path | None = None,
    hostname: str = "",
) -> str:
    """Say which TLS check failed: unknown CA, host name mismatch, missing client
    certificate, an expired certificate, or what the peer's alert says. `ca` is
    our CA file, `cert` our own certificate."""
    ca_text = f" in {ca}" if ca else ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, why = exc.verify_code, (exc.verify_message or "").rstrip(".")
        if code in _UNKNOWN_CA_CODES:
            return f"unknown CA: {peer}'s certificate is not signed by the CA{ca_text} ({why})"
        if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
            return (
                f"hostname mismatch: {peer}'s certificate is not valid for {hostname!r} "
                f"({why}; set tls-hostname to a name in its certificate)"
            )
        return f"{peer}'s certificate was refused: {why}"
    reason = exc.reason or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return (
            f"client certificate missing: {peer} sent none "
            f"(its tls-creds directory needs {CLIENT_CERT} and {CLIENT_KEY})"
        )
    if reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE"):
        return f"client certificate missing: {peer} requires one ({reason})"
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        # Our own dates were checked when the creds were loaded: the peer's clock
        # differs, or the certificate expired since.
        ours = f" {cert}" if cert else ""
        return (
            f"{peer} refused our certificate{ours} as expired ({reason}: check its "
            "notAfter and both hosts' clocks)"
        )
    if reason == "TLSV1_ALERT_UNKNOWN_CA":
        return f"unknown CA: {peer} does not trust the CA that signed our certificate"
    if reason in ("SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_DECRYPT_ERROR"):
        return f"{peer} rejected our certificate ({reason}; a host name mismatch on its side?)"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_MESSAGE", "UNKNOWN_PROTOCOL"):
        return f"{peer} does not speak TLS ({reason}: is tls-creds set on both sides?)"
    return str(exc)
