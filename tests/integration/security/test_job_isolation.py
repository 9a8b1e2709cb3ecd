"""Tenants are isolated and no client can exhaust what they share: real processes
(nats-server, a worker, an API with auth on), each attack next to the honest path.

A "parked" model has a tokenizer in the object store but no live worker, so its jobs stay
queued and their streams stay open for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.api.jobs.builder import MAX_PROMPTS
from tests.support.gateway import auth, gateway_env, write_keys_file
from tests.support.polling import wait_until
from tests.support.stack import Stack

PARKED = "parked"
KEYS = {
    "alice": {},
    "bob": {},
    "ops": {"operator": True},
    "two": {"limits": {"max_concurrent": 2}},
    "greedy": {},
}
PER_KEY_STREAMS = 3


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory, tiny_llama_long: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("isolation")
    keys = write_keys_file(root / "keys.json", KEYS)
    stack = Stack.create(root / "stack", tiny_llama_long)
    env = gateway_env(
        keys,
        JETSERVE_MAX_OPEN_STREAMS_PER_KEY=str(PER_KEY_STREAMS),
        JETSERVE_MAX_OPEN_STREAMS="100",
    )
    try:
        parked = stack.start_worker("--model-name", PARKED)  # publishes its tokenizer
        assert parked.stop() == 0
        stack.start_worker()
        stack.start_api(env=env)
        yield stack
    finally:
        stack.close()


def _submit(api: str, who: str, model: str, **body) -> str:
    payload = {"model": model, "prompt": "The fox", "max_tokens": 8, **body}
    resp = httpx.post(api + "/v1/jobs", json=payload, headers=auth(who), timeout=30)
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def _error(resp: httpx.Response, job_id: str) -> dict:
    err = resp.json()["error"]
    return {**err, "message": err["message"].replace(job_id, "ID")}


def test_jobs_belong_to_their_key(iso: Stack) -> None:
    api = iso.api.url
    job = _submit(api, "alice", PARKED)
    missing = "f" * 32
    missing_404 = httpx.get(f"{api}/v1/jobs/{missing}", headers=auth("bob"), timeout=10)
    assert missing_404.status_code == 404
    for method, path in (
        ("GET", f"/v1/jobs/{job}"),
        ("DELETE", f"/v1/jobs/{job}"),
        ("GET", f"/v1/jobs/{job}/events"),
    ):
        resp = httpx.request(method, api + path, headers=auth("bob"), timeout=10)
        # A stranger cannot tell a foreign job from a missing one.
        assert resp.status_code == 404, (method, path, resp.text)
        assert _error(resp, job) == _error(missing_404, missing)
    for who in ("alice", "ops"):  # the owner, and the operator scope
        resp = httpx.get(f"{api}/v1/jobs/{job}", headers=auth(who), timeout=10)
        assert resp.status_code == 200 and resp.json()["status"] == "queued", resp.text
    assert (
        httpx.delete(f"{api}/v1/jobs/{job}", headers=auth("alice"), timeout=10).json()["status"]
        == "cancelled"
    )


async def test_stranger_cannot_reattach_or_abort_a_stream(iso: Stack) -> None:
    api = iso.api.url
    model = iso.model_dir.name
    body = {"model": model, "prompt": "Once", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    async with httpx.AsyncClient(base_url=api, timeout=60) as client:
        async with client.stream(
            "POST", "/v1/completions", json=body, headers=auth("alice")
        ) as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            first_id = None
            async for line in lines:
                if line.startswith("id: "):
                    first_id = line[4:]
                    break
            assert first_id is not None
            job_id = first_id.split(":")[0]
            # Bob re-attaches with alice's event id, by header and by query, then leaves:
            # before, his disconnect cancelled alice's job. Now: 404 at once.
            for kwargs in (
                {"headers": {**auth("bob"), "Last-Event-ID": first_id}},
                {"headers": auth("bob"), "params": {"after": first_id}},
            ):
                t0 = time.monotonic()
                stolen = await client.post("/v1/completions", json=body, **kwargs)
                assert stolen.status_code == 404, stolen.text
                assert stolen.json()["error"]["code"] == "job_not_found"
                assert time.monotonic() - t0 < 5
            finish = None
            async for line in lines:
                if '"finish_reason":"length"' in line:
                    finish = "length"
        assert finish == "length"  # alice's stream ran to its end
        # The owner can re-attach (the job is done: she gets what followed her event).
        again = await client.post(
            "/v1/completions", json=body, headers={**auth("alice"), "Last-Event-ID": first_id}
        )
        assert again.status_code == 200 and '"finish_reason":"length"' in again.text
        # A re-attach is metered like any request, as the reader's key.
        usage = wait_until(
            lambda: [
                e for e in iso.api.log_events()
                if e.get("event") == "usage" and e.get("route") == "reattach"
            ]
        )  # fmt: skip
        assert usage[-1]["key_id"] == "key_alice" and usage[-1]["prompt_tokens"] == 0
        assert usage[-1]["completion_tokens"] > 0
        assert job_id


async def test_reattach_to_unknown_job_is_404_at_once(iso: Stack) -> None:
    body = {"model": iso.model_dir.name, "prompt": "x", "max_tokens": 4, "stream": True}
    async with httpx.AsyncClient(base_url=iso.api.url, timeout=30) as client:
        t0 = time.monotonic()
        resps = await asyncio.gather(
            *(
                client.post(
                    "/v1/completions",
                    json=body,
                    headers={**auth("greedy"), "Last-Event-ID": f"{i:032x}:3"},
                )
                for i in range(50)
            )
        )
        assert {r.status_code for r in resps} == {404}
        assert time.monotonic() - t0 < 15
        assert iso.api.metric("jetserve:open_streams") == 0  # nothing was held


async def _open_events(client: httpx.AsyncClient, job: str, who: str) -> httpx.Response:
    req = client.build_request("GET", f"/v1/jobs/{job}/events", headers=auth(who))
    return await client.send(req, stream=True)


async def test_job_events_count_against_max_concurrent(iso: Stack) -> None:
    job = _submit(iso.api.url, "two", PARKED)
    async with httpx.AsyncClient(base_url=iso.api.url, timeout=30) as client:
        held = [await _open_events(client, job, "two") for _ in range(2)]
        try:
            assert [r.status_code for r in held] == [200, 200]
            third = await client.get(f"/v1/jobs/{job}/events", headers=auth("two"))
            assert third.status_code == 429, third.text
            assert third.headers["Retry-After"]
        finally:
            for r in held:
                await r.aclose()
        # The slots come back when the readers leave.
        wait_until(lambda: iso.api.metric("jetserve:open_streams") == 0)
        again = await _open_events(client, job, "two")
        assert again.status_code == 200
        await again.aclose()


async def test_open_streams_bounded_per_key(iso: Stack) -> None:
    model = iso.model_dir.name
    job = _submit(iso.api.url, "greedy", PARKED)
    async with httpx.AsyncClient(base_url=iso.api.url, timeout=60) as client:
        wait_until(lambda: iso.api.metric("jetserve:open_streams") == 0)
        held = [await _open_events(client, job, "greedy") for _ in range(PER_KEY_STREAMS)]
        try:
            assert {r.status_code for r in held} == {200}
            over = await client.get(f"/v1/jobs/{job}/events", headers=auth("greedy"))
            assert over.status_code == 429 and "open_streams" in over.text, over.text
            # So is a request whose prompts would take more streams than are left.
            multi = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": ["a", "b"], "max_tokens": 2},
                headers=auth("greedy"),
            )
            assert multi.status_code == 429, multi.text
            # Another tenant is still served.
            ok = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": "Hi", "max_tokens": 4},
                headers=auth("alice"),
            )
            assert ok.status_code == 200, ok.text
        finally:
            for r in held:
                await r.aclose()
        # Prompts per request are bounded before anything is tokenized or queued.
        many = await client.post(
            "/v1/completions",
            json={"model": model, "prompt": ["a"] * (MAX_PROMPTS + 1), "max_tokens": 2},
            headers=auth("alice"),
        )
        assert many.status_code == 400 and "prompts" in many.text
