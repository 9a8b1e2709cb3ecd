"""`jetserve nats-auth`: what compose's setup writes, with which modes, and a server
certificate that verifies against the CA for the name clients dial."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest
from cryptography import x509

from services.nats_auth_cli import add_arguments, run, write_all
from shared.bus.nats_auth import ROLES


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.unit
def test_compose_setup_files_modes_and_certificate(tmp_path: Path) -> None:
    out = tmp_path / "secrets"
    written = write_all(out, "/etc/nats/tls", ["nats"])
    names = {p.name for p in written}
    assert names >= {f"{r}.password" for r in ROLES} | {"auth.conf", "tls.conf", "ca.crt"}
    assert "exporter.password" not in names
    assert _mode(out) == 0o700  # the directory keeps everything private on the host
    assert all(_mode(out / f"{r}.password") == 0o644 for r in ROLES)  # containers' uid
    assert _mode(out / "auth.conf") == _mode(out / "tls.key") == 0o600
    assert '"/etc/nats/tls/tls.crt"' in (out / "tls.conf").read_text()
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nats"]
    # Re-running setup changes nothing: the containers keep their passwords and the CA.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_all(out, "/etc/nats/tls", ["nats"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.unit
def test_tls_hosts_needs_tls_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "s"), "--tls-hosts", "nats"])
    assert run(args) == 2
    assert "--tls-dir" in capsys.readouterr().out
