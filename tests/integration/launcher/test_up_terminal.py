"""`jetserve up` at a terminal prints readable lines and no third-party banner; piped, the
services' lines are JSON a log collector can parse."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.support.nats_process import free_port
from tests.support.paths import REPO_ROOT

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NATS_BANNER = ("Starting nats-server", "Server is ready", "[INF]")


def _up_argv(model: Path, data_dir: Path) -> tuple[list[str], int, int]:
    api_port, nats_port, metrics_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "services.cli", "up", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(api_port), "--nats-port", str(nats_port),
            "--metrics-port", str(metrics_port), "--data-dir", str(data_dir)]  # fmt: skip
    return argv, api_port, metrics_port


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JETSERVE_LOG_LEVEL": "info"}
    env.pop("JETSERVE_LOG_JSON", None)
    return env


def _exercise_and_stop(proc: subprocess.Popen, api_port: int, seen: list[str]) -> None:
    """Wait for the ready line, make one request (it logs), then Ctrl-C."""
    deadline = time.monotonic() + 180
    while not any("jetserve is up" in line for line in seen):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)
        time.sleep(0.2)
    r = httpx.post(
        f"http://127.0.0.1:{api_port}/v1/completions",
        json={"model": "m", "prompt": "Hello", "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0


def test_up_at_a_terminal_prints_console_lines_and_no_nats_banner(
    tmp_path: Path, tiny_llama: Path
) -> None:
    model = tmp_path / "m"
    model.symlink_to(tiny_llama)
    argv, api_port, _ = _up_argv(model, tmp_path / "data")
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=_env(), stdin=slave, stdout=slave,
                            stderr=slave)  # fmt: skip
    os.close(slave)
    chunks: list[str] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO once every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _exercise_and_stop(proc, api_port, chunks)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    os.close(master)
    text = ANSI.sub("", "".join(chunks)).replace("\r", "")
    lines = [line for line in text.splitlines() if line.strip()]
    json_lines = [line for line in lines if line.lstrip().startswith("{")]
    assert not json_lines, json_lines[:3]
    banner = [line for line in lines if any(b in line for b in NATS_BANNER)]
    assert not banner, banner[:3]
    # The services did log, as console lines (uvicorn's startup through our renderer).
    assert any("Uvicorn running on" in line for line in lines), text
    assert any("[info" in line for line in lines), text
    assert "Starting nats-server" in (tmp_path / "data" / "nats-server.log").read_text()


def test_up_without_a_terminal_writes_json_lines(tmp_path: Path, tiny_llama: Path) -> None:
    model = tmp_path / "m"
    model.symlink_to(tiny_llama)
    argv, api_port, _ = _up_argv(model, tmp_path / "data")
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.daemon = True
    reader.start()
    try:
        _exercise_and_stop(proc, api_port, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    service_lines = [
        line for line in lines if line.strip() and not line.startswith(("jetserve", "  "))
    ]
    events = [json.loads(line) for line in service_lines]  # every one parses
    assert any(e.get("event", "").startswith("Uvicorn running on") for e in events), lines
    assert not any(any(b in line for b in NATS_BANNER) for line in lines)
