"""`jetserve nats-auth --out DIR`: the NATS identities' passwords and the server's auth file.

Writes `<role>.password` for api, worker, operator and exporter (random, mode 0600;
existing ones are kept) and `auth.conf`, the `authorization` block nats-server includes
(users and their least-privilege permissions, shared/bus/nats_auth.py). With `--tls-dir`
also `tls.conf` (client TLS) and `cluster-tls.conf` (routes: mutual TLS, each node
proves itself with a certificate of the same CA) naming `tls.crt`, `tls.key`, `ca.crt`
in that directory as the server will see it. docs/security.md says where each file goes
in compose (secrets) and Kubernetes (Secrets).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import ClassVar

from shared.bus.nats_auth import TlsFiles, cluster_tls_block, tls_block, write_credentials
from shared.settings import Settings, add_flags, setting


class NatsAuthOptions(Settings):
    section: ClassVar[str] = "nats-auth"

    out: str = setting(env=None, help="directory for the password files and auth.conf")
    tls_dir: str | None = setting(
        None,
        env=None,
        help="where the server will find tls.crt, tls.key and ca.crt (e.g. "
        "/etc/nats/secrets); writes tls.conf and cluster-tls.conf naming them",
    )


def write_all(out: Path, tls_dir: str | None) -> list[Path]:
    write_credentials(out)
    written = [*sorted(out.glob("*.password")), out / "auth.conf"]
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
    for path in write_all(Path(options.out), options.tls_dir):
        print(path)
    return 0
