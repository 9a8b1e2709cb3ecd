"""The processes of a benchmark's stack: nats-server, workers and API replicas started as
subprocesses, each logging to a file, and stopped with nats-server last (every service
stops while its bus is still there). One place for what serving_bench, token_plane_bench
and routing_bench (sibling scripts, not a package) each spelled out.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env() -> dict[str, str]:
    """This environment, with what the benchmarks' services run under: warnings only, no
    API keys (they measure serving, not the gateway), one thread for tokenizers and torch."""
    return {
        **os.environ,
        "JETSERVE_LOG_LEVEL": "warning",
        "JETSERVE_AUTH": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


def spawn(log: Path, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """One process of the stack, run from the repository root, its output into `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_nats(folder: Path) -> tuple[subprocess.Popen, str]:
    """A JetStream nats-server on a free local port, its streams in `folder`/js and its
    output in `folder`/nats.log; (the process, its URL)."""
    from services.launcher import nats_server_binary

    try:
        binary = nats_server_binary()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    port = free_port()
    argv = [binary, "-js", "-sd", str(folder / "js"), "-a", "127.0.0.1", "-p", str(port)]
    return spawn(folder / "nats.log", argv, dict(os.environ)), f"nats://127.0.0.1:{port}"


def stop_processes(procs: dict[str, subprocess.Popen]) -> None:
    """Terminate each (killed after 20 s), nats-server last."""
    for name in [n for n in procs if n != "nats"] + ["nats"]:
        procs[name].terminate()
        try:
            procs[name].wait(timeout=20)
        except subprocess.TimeoutExpired:
            procs[name].kill()


def last_device_stats(log: Path) -> dict:
    """The latest `simulated_device` line of a worker's log ({} before the first): the
    simulated device writes one every 2 s of steps."""
    last: dict = {}
    for line in log.read_text(errors="replace").splitlines():
        if '"simulated_device"' in line:
            with contextlib.suppress(ValueError):
                last = json.loads(line)
    return last
