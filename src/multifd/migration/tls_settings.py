"""From the `tls-*` parameters to the channels layer's TLS configuration."""

from __future__ import annotations

from ..channels.tls import TLSConfig
from .params import MigrationSettings


def tls_config(settings: MigrationSettings) -> TLSConfig | None:
    """None without `tls-creds`. `tls-authz` lists subjects separated by ';'
    (a subject itself contains commas)."""
    creds = settings.parameter("tls-creds")
    if not creds:
        return None
    authz = tuple(s.strip() for s in settings.parameter("tls-authz").split(";") if s.strip())
    return TLSConfig(creds, settings.parameter("tls-hostname"), authz)
