"""Three real nats-server processes on loopback, run from deploy/nats/cluster.conf.

Each node gets its own free ports and store directory on the command line, which is
how the shipped config expects to be used (Kubernetes passes the same flags). The
config's secrets/ includes are made as an operator would (`jetserve nats-auth
--tls-dir`) with certificates the test generates: identities, client TLS, route mTLS.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.launcher import nats_server_binary
from services.nats_auth_cli import write_all
from shared.bus.nats_auth import inbox_prefix
from tests.support.deploy_files import NATS_CLUSTER_CONF
from tests.support.nats_process import free_port, wait_for_port
from tests.support.nats_tls import write_tls_files


@dataclass
class ClusterNode:
    name: str
    store_dir: Path
    log_path: Path
    conf: Path = NATS_CLUSTER_CONF
    client_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def route_url(self) -> str:
        return f"nats://127.0.0.1:{self.cluster_port}"

    def start(self, routes: list[str]) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-c",
                str(self.conf),
                "--name",
                self.name,
                "--store_dir",
                str(self.store_dir),
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.client_port),
                "--http_port",
                str(self.monitor_port),
                "--cluster",
                self.route_url,
                "--routes",
                ",".join(routes),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.client_port, self.proc)

    def kill(self) -> None:
        """SIGKILL: no lame duck, no flush; what a node crash looks like."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def healthy(self) -> bool:
        """JetStream up and this node current with the cluster's meta leader."""
        try:
            r = httpx.get(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200


@dataclass
class LoopbackCluster:
    nodes: list[ClusterNode]
    secrets: Path

    def password(self, role: str) -> str:
        return (self.secrets / f"{role}.password").read_text().strip()

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.secrets / "ca.crt"))

    def connect_kwargs(self, role: str = "operator") -> dict[str, Any]:
        """How a client of this cluster connects: an identity, over TLS."""
        return {
            "servers": self.client_urls,
            "user": role,
            "password": self.password(role),
            "inbox_prefix": inbox_prefix(role),
            "tls": self.tls_context(),
        }

    @property
    def routes(self) -> list[str]:
        return [n.route_url for n in self.nodes]

    @property
    def client_urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, name: str) -> ClusterNode:
        return next(n for n in self.nodes if n.name == name)

    def start(self, timeout: float = 30.0) -> None:
        for n in self.nodes:
            n.start(self.routes)
        self.wait_healthy(self.nodes, timeout)

    def wait_healthy(self, nodes: list[ClusterNode], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(n.healthy() for n in nodes):
            if time.monotonic() > deadline:
                logs = "\n".join(n.log_path.read_text()[-2000:] for n in nodes)
                raise TimeoutError(f"cluster not healthy after {timeout}s:\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def loopback_cluster(root: Path, size: int = 3) -> LoopbackCluster:
    conf_dir = root / "conf"
    secrets = conf_dir / "secrets"
    write_tls_files(secrets)
    write_all(secrets, str(secrets.resolve()))
    conf = conf_dir / "cluster.conf"
    shutil.copy(NATS_CLUSTER_CONF, conf)
    nodes = []
    for i in range(size):
        (root / f"n{i}").mkdir(parents=True, exist_ok=True)
        nodes.append(ClusterNode(f"n{i}", root / f"n{i}", root / f"n{i}.log", conf=conf))
    return LoopbackCluster(nodes, secrets)
