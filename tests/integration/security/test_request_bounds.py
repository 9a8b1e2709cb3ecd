"""Requests that used to cost the server far more than they cost the client, on a real
stack (nats-server, worker, API): each is refused cheaply, and honest requests around it
are served as before."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import nats

from shared.bus.subjects import JOB_RECORDS_BUCKET
from tests.support.stack import Stack

MIB = 1024 * 1024


async def test_huge_prompt_is_refused_before_tokenizing_and_stalls_nobody(stack: Stack) -> None:
    model = stack.model_dir.name
    big = "lorem ipsum " * (7 * MIB // 12)  # ~7 MiB: under the body limit, far over context
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=60) as client:
        latencies: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                small = await client.post(
                    "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2}
                )
                assert small.status_code == 200, small.text
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        huge = await asyncio.gather(
            client.post("/v1/completions", json={"model": model, "prompt": big}),
            client.post("/v1/completions", json={"model": model, "prompt": ["x", big]}),
            client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": big}]},
            ),
            client.post("/v1/jobs", json={"model": model, "prompt": big}),
        )
        refused_in = time.monotonic() - t0
        await asyncio.sleep(0.3)
        done.set()
        await prober
    for resp in huge:
        assert resp.status_code == 400, resp.text[:300]
        assert resp.json()["error"]["code"] == "context_length_exceeded"
    # Before: 14-18 s to refuse one such prompt, with every other request stalled as long.
    assert refused_in < 5.0, refused_in
    assert latencies and max(latencies) < 3.0, latencies


def test_deeply_nested_json_is_a_400(stack: Stack) -> None:
    depth = 100_000
    bodies = [
        "[" * depth + "]" * depth,
        '{"model": "m", "prompt": ' + "[" * depth + "]" * depth + "}",
        '{"model": "m", "messages": [{"role": "user", "content": "x", "extra": '
        + '{"a":' * depth
        + "1"
        + "}" * depth
        + "}]}",
    ]
    for path in ("/v1/jobs", "/v1/completions", "/v1/chat/completions"):
        for body in bodies:
            resp = httpx.post(
                stack.api.url + path,
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            assert resp.status_code == 400, (path, resp.status_code, resp.text[:200])


async def test_unknown_fields_are_not_stored(stack: Stack) -> None:
    model = stack.model_dir.name
    body = {"model": model, "prompt": "Hi", "max_tokens": 2, "junk": "x" * (2 * MIB)}
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=30) as client:
        resp = await client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text[:300]  # before: 503 (the record was > 1 MiB)
    job_id = resp.json()["id"]
    nc = await nats.connect(stack.nats_url)
    try:
        kv = await nc.jetstream().key_value(JOB_RECORDS_BUCKET)
        stored = json.loads((await kv.get(job_id)).value)
    finally:
        await nc.close()
    assert "junk" not in stored["body"] and stored["body"]["prompt"] == "Hi"
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=30) as client:
        status = await client.get(f"/v1/jobs/{job_id}")
    assert status.status_code == 200


def test_errors_do_not_echo_huge_input(stack: Stack) -> None:
    name = "m" * 100_000
    in_path = "m" * 8_000  # a request line must fit uvicorn's header limit
    for resp in (
        httpx.get(f"{stack.api.url}/v1/models/{in_path}", timeout=30),
        httpx.post(
            stack.api.url + "/v1/completions", json={"model": name, "prompt": "x"}, timeout=30
        ),
        httpx.post(
            stack.api.url + "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "x"}]},
            timeout=30,
        ),
        httpx.get(f"{stack.api.url}/v1/jobs/{in_path}", timeout=30),
    ):
        assert resp.status_code == 404, resp.text[:200]
        assert len(resp.content) < 400, len(resp.content)
    honest = httpx.get(f"{stack.api.url}/v1/models/{stack.model_dir.name}", timeout=30)
    assert honest.status_code == 200
