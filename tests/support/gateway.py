"""Helpers for the gateway tests: seeded keys, auth headers, the keys CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support.stack import REPO_ROOT, ServiceProcess

T = TypeVar("T")


def secret(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret(name)}"}


def write_keys_file(path: Path, keys: dict[str, dict[str, Any]]) -> Path:
    """keys: name -> {limits?, priority_class?}; each key's id is `key_<name>`."""
    entries = [
        {"key": secret(name), "name": name, "id": f"key_{name}", **spec}
        for name, spec in keys.items()
    ]
    path.write_text(json.dumps(entries))
    return path


def gateway_env(keys_file: Path, **extra: str) -> dict[str, str]:
    return {"JETSERVE_AUTH": "1", "JETSERVE_API_KEYS_FILE": str(keys_file), **extra}


def keys_cli(nats_url: str, *args: str) -> Any:
    """Run `jetserve keys --json ...` as an operator would; its parsed JSON output."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "keys", "--nats-url", nats_url, "--json", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_openai_error(resp: httpx.Response, status: int, error_type: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == error_type and err["message"]
    return err


def completion(
    api: ServiceProcess, model: str, headers: dict[str, str], **body: Any
) -> httpx.Response:
    payload = {"model": model, "prompt": [1, 2, 3, 4, 5], "max_tokens": 2, **body}
    return httpx.post(api.url + "/v1/completions", json=payload, headers=headers, timeout=60)
