"""`jetserve nats-auth --out DIR`: the NATS identities' passwords and the server's auth file.

Writes `<role>.password` for api, worker and operator (random; existing ones are kept)
and `auth.conf`, the `authorization` block nats-server includes (users and their
least-privilege permissions, shared/bus/nats_auth.py). DIR is made mode 0700; the
password files are readable by other uids inside it (0644), because compose bind-mounts
each one into a container that runs as its own user (uid 10001); `auth.conf` and keys
stay 0600. With `--tls-dir` also `tls.conf` (client TLS) and `cluster-tls.conf` (routes:
mutual TLS, each node proves itself with a certificate of the same CA) naming `tls.crt`,
`tls.key`, `ca.crt` in that directory as the server will see it; with `--tls-hosts`
those three files are generated into DIR too (a private CA, compose's setup). docs/deploy.md
says where each file goes in compose (secrets) and Kubernetes (Secrets).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import ClassVar

from shared.bus.nats_auth import TlsFiles, cluster_tls_block, tls_block, write_credentials
from shared.settings import Settings, add_flags, setting

PASSWORD_MODE = 0o644  # inside the 0700 directory: see the module docstring


class NatsAuthOptions(Settings):
    section: ClassVar[str] = "nats-auth"

    out: str = setting(env=None, help="directory for the password files and auth.conf")
    tls_dir: str | None = setting(
        None,
        env=None,
        help="where the server will find tls.crt, tls.key and ca.crt (e.g. "
        "/etc/nats/secrets); writes tls.conf and cluster-tls.conf naming them",
    )
    tls_hosts: str | None = setting(
        None,
        env=None,
        help="comma-separated names clients dial the server by (e.g. nats): also make a "
        "private CA and the server's certificate into --out (ca.crt, tls.crt, tls.key; "
        "kept if present); needs --tls-dir",
    )


def write_all(out: Path, tls_dir: str | None, tls_hosts: list[str] | None = None) -> list[Path]:
    write_credentials(out, password_mode=PASSWORD_MODE)
    written = [*sorted(out.glob("*.password")), out / "auth.conf"]
    if tls_hosts:
        if not tls_dir:
            raise ValueError("--tls-hosts needs --tls-dir (where the server reads the files)")
        from shared.bus.nats_certs import write_certificates  # cryptography: setup only

        written += write_certificates(out, tls_hosts)
    if tls_dir:
        files = TlsFiles(f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key", f"{tls_dir}/ca.crt")
        (out / "tls.conf").write_text(tls_block(files))
        (out / "cluster-tls.conf").write_text(cluster_tls_block(files))
        written += [out / "tls.conf", out / "cluster-tls.conf"]
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, NatsAuthOptions)


def run(args: argparse.Namespace) -> int:
    options = NatsAuthOptions.from_args(args)
    hosts = [h.strip() for h in (options.tls_hosts or "").split(",") if h.strip()]
    try:
        paths = write_all(Path(options.out), options.tls_dir, hosts)
    except ValueError as e:
        print(f"jetserve nats-auth: {e}")
        return 2
    for path in paths:
        print(path)
    return 0
