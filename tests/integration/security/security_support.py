"""Helpers of the security tests: seeded keys and their headers, waiting for a condition."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def secret(name: str) -> str:
    return f"sk-sec-{name}-0123456789abcdef"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret(name)}"}


def write_keys_file(path: Path, keys: dict[str, dict[str, Any]]) -> Path:
    """keys: name -> {limits?, priority_class?, operator?}; each key's id is `key_<name>`."""
    entries = [
        {"key": secret(name), "name": name, "id": f"key_{name}", **spec}
        for name, spec in keys.items()
    ]
    path.write_text(json.dumps(entries))
    return path


def gateway_env(keys_file: Path, **extra: str) -> dict[str, str]:
    return {"JETSERVE_AUTH": "1", "JETSERVE_API_KEYS_FILE": str(keys_file), **extra}


def wait_until(predicate: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
