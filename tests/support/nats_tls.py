"""Certificates for tests: a CA, and a server/client certificate it signs for localhost
and 127.0.0.1 (the same code `jetserve nats-auth --tls-hosts` runs)."""

from __future__ import annotations

from pathlib import Path

from shared.bus.nats_certs import write_certificates


def write_tls_files(directory: Path, ca_name: str = "jetserve-test-ca") -> Path:
    """ca.crt, and tls.crt/tls.key for localhost and 127.0.0.1 (server and client use)."""
    write_certificates(directory, ["localhost", "127.0.0.1"], days=1, ca_name=ca_name)
    return directory
