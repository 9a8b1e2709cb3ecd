"""The jobs queue is bounded and jobs do not outlive their records; a job's status costs a
few reads however long the job. Real processes: nats-server, a worker, an API; a parked
model (tokenizer published, no live worker) whose jobs wait in the queue."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from shared.bus.subjects import JOB_RECORDS_BUCKET, JOBS_STREAM, events_subject, jobs_subject
from shared.messages import CompletionChunk, Delta, decode_job, encode_delta
from shared.settings import BusSettings
from tests.support.stack import Stack

PARKED = "parked"
MAX_JOBS = 4
QUEUE_AGE_S = 6.0
DEADLINE_S = 900.0


@pytest.fixture(scope="module")
def qstack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    stack = Stack.create(tmp_path_factory.mktemp("queue") / "stack", tiny_llama)
    stack.env.update(
        JETSERVE_QUEUE_MAX_JOBS=str(MAX_JOBS),
        JETSERVE_QUEUE_MAX_AGE=str(QUEUE_AGE_S),
        JETSERVE_JOB_DEADLINE=str(DEADLINE_S),
    )
    try:
        assert stack.start_worker("--model-name", PARKED).stop() == 0
        stack.start_worker()
        stack.start_api()
        yield stack
    finally:
        stack.close()


async def _submit(client: httpx.AsyncClient, model: str = PARKED) -> httpx.Response:
    return await client.post("/v1/jobs", json={"model": model, "prompt": "Fox", "max_tokens": 4})


async def test_full_queue_is_a_429_and_old_jobs_expire(qstack: Stack) -> None:
    async with httpx.AsyncClient(base_url=qstack.api.url, timeout=60) as client:
        await _full_queue_then_expiry(qstack, client)


async def _full_queue_then_expiry(qstack: Stack, client: httpx.AsyncClient) -> None:
    accepted = [await _submit(client) for _ in range(MAX_JOBS)]
    assert [r.status_code for r in accepted] == [202] * MAX_JOBS
    t_full = time.time()
    full = await _submit(client)
    assert full.status_code == 429, full.text
    assert int(full.headers["Retry-After"]) >= 1
    # Another model's queue is its own: served as usual.
    ok = await client.post(
        "/v1/completions", json={"model": qstack.model_dir.name, "prompt": "Hi", "max_tokens": 2}
    )
    assert ok.status_code == 200, ok.text
    # Every job carries the default deadline; records outlive deadline + event retention.
    nc = await nats.connect(qstack.nats_url)
    try:
        js = nc.jetstream()
        msg = await js.get_last_msg(JOBS_STREAM, jobs_subject(PARKED))
        job = decode_job(msg.data)
        assert job.deadline is not None
        assert abs(job.deadline - job.created_at - DEADLINE_S) < 1.0
        status = await (await js.key_value(JOB_RECORDS_BUCKET)).status()
        assert status.ttl >= DEADLINE_S + BusSettings().events_max_age_s
    finally:
        await nc.close()
    # Past the queue's age limit the queued jobs are gone, say so, and free their places.
    first = accepted[0].json()["id"]
    deadline = time.monotonic() + 30
    while True:
        view = await client.get(f"/v1/jobs/{first}")
        assert view.status_code == 200
        if view.json()["status"] == "expired" and (await _submit(client)).status_code == 202:
            break
        assert time.monotonic() < deadline, view.text
        await asyncio.sleep(0.5)
    assert time.time() - t_full >= QUEUE_AGE_S - 1


async def _accepted(client: httpx.AsyncClient) -> str:
    """A queued job's id. The module's parked queue may still be full from the test before
    (its last accepted job took the place an expiry freed) until more of its jobs pass the
    age limit; on a loaded box that can be a few seconds after that test ended."""
    deadline = time.monotonic() + QUEUE_AGE_S + 30
    while True:
        resp = await _submit(client)
        if resp.status_code == 202:
            return resp.json()["id"]
        assert resp.status_code == 429 and time.monotonic() < deadline, resp.text
        await asyncio.sleep(0.5)


async def test_status_of_a_long_job_is_a_batched_read(qstack: Stack) -> None:
    async with httpx.AsyncClient(base_url=qstack.api.url, timeout=60) as client:
        job_id = await _accepted(client)
    n = 1500
    nc = await nats.connect(qstack.nats_url)
    try:
        js = nc.jetstream()
        for seq in range(n):
            delta = Delta(job_id=job_id, seq=seq, chunks=[CompletionChunk(0, [5, 6])])
            await js.publish(events_subject(job_id), encode_delta(delta))
    finally:
        await nc.close()
    async with httpx.AsyncClient(base_url=qstack.api.url, timeout=60) as client:
        t0 = time.monotonic()
        views = await asyncio.gather(*(client.get(f"/v1/jobs/{job_id}") for _ in range(10)))
        took = time.monotonic() - t0
    assert [v.status_code for v in views] == [200] * 10  # before: 8 of 10 were 500s
    body = views[0].json()
    assert body["status"] == "running"
    assert body["usage"]["completion_tokens"] == 2 * n
    assert body["last_event_id"] == f"{job_id}:{n - 1}"
    print(json.dumps({"concurrent_gets": 10, "deltas": n, "seconds": round(took, 3)}))
