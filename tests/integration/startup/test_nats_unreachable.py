"""With no NATS at the URL, the API and a worker wait --nats-connect-timeout, then exit
non-zero with one line naming the URL; no traceback scrolls past a newcomer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.nats_process import free_port

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("command", ["api", "worker"])
def test_no_nats_is_one_clear_error(command: str, tiny_llama: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    argv = [sys.executable, "-m", "services.cli", command, "--nats-url", url,
            "--nats-connect-timeout", "2", "--log-json"]  # fmt: skip
    if command == "api":
        argv += ["--port", str(free_port()), "--no-auth"]
    else:
        argv += ["--model", str(tiny_llama), "--metrics-port", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")}
    result = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert f"cannot reach NATS at {url} after 2s" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("command", [["keys", "list"], ["dead", "list"], ["models", "list"]])
def test_one_shot_commands_fail_fast_without_nats(command: list[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *command, "--nats-url", url],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stdout == ""  # nothing that a script reading --json output would parse
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"cannot reach NATS at {url} after 5s" in result.stderr
