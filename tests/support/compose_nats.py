"""compose's nats-server without Docker: deploy/nats/nats.conf verbatim, with the secrets
compose mounts, made as docs/deploy.md says (`jetserve nats-auth --out DIR --tls-dir DIR
--tls-hosts localhost`: identities, a private CA and the server's certificate, client
TLS required). Only what a container fixes is moved: ports, store directory, and the
directory the secrets lie in (the config's includes are relative to it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from services.launcher import nats_server_binary
from services.nats_auth_cli import write_all
from tests.support.deploy_files import NATS_CONF
from tests.support.nats_process import free_port, wait_for_port


class ComposeNats:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.secrets = root / "secrets"
        self.port, self.monitor_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        write_all(self.secrets, str(self.secrets.resolve()), ["localhost"])
        # The container's volume at /data: a folder here (nats-server refuses a second
        # store_dir on its command line).
        text = NATS_CONF.read_text()
        assert text.count("store_dir: /data\n") == 1, "nats.conf's store_dir moved"
        data = json.dumps(str((root / "data").resolve()))
        (self.secrets / "nats.conf").write_text(
            text.replace("store_dir: /data", f"store_dir: {data}")
        )

    @property
    def url(self) -> str:
        return f"nats://localhost:{self.port}"  # the name the certificate carries

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "nats-server.log"

    @property
    def ca(self) -> Path:
        return self.secrets / "ca.crt"

    def password_file(self, role: str) -> Path:
        return self.secrets / f"{role}.password"

    def start(self) -> None:
        args = [nats_server_binary(), "-c", str(self.secrets / "nats.conf"), "-a", "127.0.0.1"]
        args += ["-p", str(self.port), "-m", str(self.monitor_port)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
