"""Finding a worker's engine process and telling when a process is gone."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.stack import ServiceProcess


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie is left (nobody reaped it yet)."""
    status = Path(f"/proc/{pid}/status")
    try:
        text = status.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = next((line for line in text.splitlines() if line.startswith("State:")), "")
    return "Z" in state.split()[1:2]


def wait_gone(pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return process_gone(pid)


def engine_pid(worker: ServiceProcess, timeout_s: float = 30.0) -> int:
    """The pid of the worker's engine process, from its `engine_process_started` line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in worker.log_events():
            if event.get("event") == "engine_process_started":
                return int(event["pid"])
        time.sleep(0.05)
    raise TimeoutError(f"{worker.name} logged no engine_process_started")
