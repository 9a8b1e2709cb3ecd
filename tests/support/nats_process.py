"""Real nats-server processes for tests: free ports, start/stop/kill, readiness waits.
The `nats_server` fixture (tests/conftest.py) is one of these."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from services import launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """The launcher's readiness wait: fails fast if the process died while starting."""
    launcher.wait_for_port(port, proc, timeout)


class NatsServer:
    """A real nats-server process with JetStream; restartable on the same port and store.

    `secured`: run it as `jetserve up` does, from the launcher's generated config (three
    identities with passwords in `auth_dir`, no anonymous access), logging to `log_path`.
    """

    def __init__(self, store_dir: Path, port: int | None = None, secured: bool = False) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.secured = secured

    @property
    def auth_dir(self) -> Path:
        return self.store_dir / launcher.AUTH_DIR

    @property
    def log_path(self) -> Path:
        return self.store_dir.parent / "nats-server.log"

    def password(self, role: str) -> str:
        return (self.auth_dir / f"{role}.password").read_text().strip()

    def identity_env(self, role: str) -> dict[str, str]:
        return launcher.identity_env(self.auth_dir.resolve(), role)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.secured:
            config = launcher.write_local_nats_config(self.store_dir, self.port)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [launcher.nats_server_binary(), "-c", str(config)], stdout=log, stderr=log
                )
            wait_for_port(self.port, self.proc)
            return
        self.proc = subprocess.Popen(
            [
                launcher.nats_server_binary(),
                "-js",
                "-sd",
                str(self.store_dir),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=10)
        self.proc = None
