"""NATS identities against a real nats-server run from the generated config (the one
`jetserve up` writes): every honest path of the API, a worker and the CLIs works within
its permissions, and each identity is refused what it must not do; an unauthenticated
connection is refused outright (issue 17, finding 1)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from services.api.gateway.keys import ApiKeyRecord, hash_secret
from shared.bus.subjects import (
    API_KEYS_BUCKET,
    EVENTS_STREAM,
    JOBS_STREAM,
    WORKERS_BUCKET,
    consumer_name,
    events_subject,
    jobs_subject,
    routed_jobs_subject,
)
from shared.messages import CompletionChunk, Delta, encode_delta
from tests.support.gateway import auth, gateway_env, secret, write_keys_file
from tests.support.stack import REPO_ROOT, Stack

DENIED_S = 2.0


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("nats-identities")
    keys = write_keys_file(root / "keys.json", {"alice": {}})
    stack = Stack.create(root / "stack", tiny_llama, secured=True)
    try:
        stack.start_worker()
        stack.start_api(env=gateway_env(keys))
        yield stack
    finally:
        stack.close()


async def _connect(stack: Stack, role: str | None, password: str | None = None, errors=None):
    async def on_error(e: Exception) -> None:
        if errors is not None:
            errors.append(str(e))

    kwargs = {"error_cb": on_error, "allow_reconnect": False, "connect_timeout": 3}
    if role is not None:
        kwargs |= {
            "user": role,
            "password": password or stack.nats.password(role),
            "inbox_prefix": f"_INBOX.{role}",
        }
    return await nats.connect(stack.nats_url, **kwargs)


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **stack.nats.identity_env("operator"),
        "JETSERVE_NATS_URL": stack.nats_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_honest_paths_work_within_permissions(secured: Stack) -> None:
    api, model = secured.api.url, secured.model_dir.name
    body = {"model": model, "prompt": "Once", "max_tokens": 12, "temperature": 0}
    done = httpx.post(f"{api}/v1/completions", json=body, headers=auth("alice"), timeout=60)
    assert done.status_code == 200, done.text
    stream = httpx.post(
        f"{api}/v1/completions", json={**body, "stream": True}, headers=auth("alice"), timeout=60
    )
    first_id = next(line[4:] for line in stream.text.splitlines() if line.startswith("id: "))
    again = httpx.post(
        f"{api}/v1/completions",
        json={**body, "stream": True},
        headers={**auth("alice"), "Last-Event-ID": first_id},
        timeout=60,
    )
    assert again.status_code == 200 and "[DONE]" in again.text
    job = httpx.post(f"{api}/v1/jobs", json=body, headers=auth("alice"), timeout=60).json()["id"]
    status = httpx.get(f"{api}/v1/jobs/{job}", headers=auth("alice"), timeout=60)
    assert status.status_code == 200
    assert (
        httpx.delete(f"{api}/v1/jobs/{job}", headers=auth("alice"), timeout=60).status_code == 200
    )
    # The operator identity runs the CLIs.
    created = _cli(secured, "keys", "--json", "create", "--name", "bob")
    assert created.returncode == 0, created.stderr
    bob = json.loads(created.stdout)["key"]
    ok = httpx.post(
        f"{api}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {bob}"},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    dead = _cli(secured, "dead", "list", "--json")
    assert dead.returncode == 0, dead.stderr
    violations = [
        line for line in secured.nats.log_path.read_text().splitlines() if "Violation" in line
    ]
    assert not violations, violations[:5]


async def test_unauthenticated_and_wrong_password_are_refused(secured: Stack) -> None:
    for role, password in ((None, None), ("api", "not-the-password"), ("root", "x")):
        with pytest.raises(Exception) as caught:
            nc = await _connect(secured, role, password)
            await nc.close()
        assert "uthorization" in repr(caught.value) or "NoServers" in repr(caught.value)


async def _refused(coro) -> bool:
    try:
        await asyncio.wait_for(coro, DENIED_S)
    except Exception:
        return True
    return False


async def test_worker_cannot_touch_api_keys(secured: Stack) -> None:
    errors: list[str] = []
    nc = await _connect(secured, "worker", errors=errors)
    try:
        js = nc.jetstream(timeout=DENIED_S)
        kv = await js.key_value(API_KEYS_BUCKET)  # stream info is allowed; contents are not
        assert await _refused(kv.get(hash_secret(secret("alice"))))
        minted = ApiKeyRecord(id="key_evil", name="evil", secret_sha256=hash_secret("x" * 40))
        assert await _refused(kv.put(minted.secret_sha256, minted.to_json()))
        # Nor read another identity's replies.
        await nc.subscribe("_INBOX.api.>")
        await nc.flush()
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    assert any("permissions violation" in e.lower() for e in errors), errors
    # The key was not minted: the API still refuses it.
    async with httpx.AsyncClient(base_url=secured.api.url, timeout=10) as client:
        resp = await client.get("/v1/models", headers={"Authorization": "Bearer " + "x" * 40})
    assert resp.status_code == 401


async def test_api_cannot_impersonate_a_worker_or_pull_jobs(secured: Stack) -> None:
    nc = await _connect(secured, "api")
    try:
        js = nc.jetstream(timeout=DENIED_S)
        workers = await js.key_value(WORKERS_BUCKET)
        assert await _refused(workers.put("fake.worker", b"{}"))
        model = secured.model_dir.name
        sub = await js.pull_subscribe(
            jobs_subject(model), durable=consumer_name(model), stream=JOBS_STREAM
        )
        assert await _refused(sub.fetch(1, timeout=DENIED_S))
        # What it does need still works: reading a job's log.
        await js.publish(
            events_subject("probe"),
            encode_delta(Delta(job_id="probe", seq=0, chunks=[CompletionChunk(0, [1])])),
        )
        msg = await js.get_last_msg(EVENTS_STREAM, events_subject("probe"))
        assert msg.data
    finally:
        await nc.close()


async def test_there_is_no_monitoring_identity(secured: Stack) -> None:
    """The `exporter` identity was dropped (docs/security.md): what scrapes NATS reads the
    HTTP monitoring port, which takes no identity. No password is generated for it and
    the server refuses the name, whatever the password (the operator's included)."""
    assert not (secured.nats.auth_dir / "exporter.password").exists()
    for password in ("x", secured.nats.password("operator")):
        with pytest.raises(Exception) as caught:
            nc = await _connect(secured, "exporter", password)
            await nc.close()
        assert "uthorization" in repr(caught.value) or "NoServers" in repr(caught.value)


async def test_a_worker_moves_jobs_only_to_a_shared_queue(secured: Stack) -> None:
    """Prefix routing lets a worker publish to `llm.jobs.<model>` (a fallback move), never
    to another worker's routed subject."""
    nc = await _connect(secured, "worker")
    try:
        js = nc.jetstream(timeout=DENIED_S)
        model = secured.model_dir.name
        assert await _refused(js.publish(routed_jobs_subject(model, "someone"), b"x"))
        # (Publishing to the shared queue is allowed: tests/integration/routing checks
        # the moves work under these identities with no permission violation.)
    finally:
        await nc.close()
