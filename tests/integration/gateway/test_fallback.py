"""Fallback upstream: a second jetserve (its own nats-server, worker and API, auth on) takes
the primary's requests while the primary has no worker for the model, or while its queue
is backed up past the threshold; the primary serves again once that is over.

Requests go through the official openai client to the primary, streaming included; the
upstream's answer must come through unchanged (greedy text equals a direct request).
The tests are steps of one scenario on module-scoped stacks and run in file order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.gateway import auth, gateway_env, secret, write_keys_file
from tests.support.polling import wait_until
from tests.support.stack import BusClient, Stack

QUEUE_WAIT_S = 1.0


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("upstream")
    keys = write_keys_file(root / "keys.json", {"upstream": {}, "ops": {"operator": True}})
    stack = Stack.create(root / "stack", tiny_llama)
    try:
        stack.start_worker()
        stack.start_api(env=gateway_env(keys)).metrics_headers = auth("ops")
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def primary(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, upstream: Stack
) -> Iterator[Stack]:
    """Starts with no worker: its API answers /health but not /ready."""
    root = tmp_path_factory.mktemp("primary")
    keys = write_keys_file(root / "keys.json", {"client": {}, "ops": {"operator": True}})
    stack = Stack.create(root / "stack", tiny_llama)
    env = gateway_env(
        keys,
        JETSERVE_FALLBACK_URL=upstream.api.url + "/v1",
        JETSERVE_FALLBACK_API_KEY=secret("upstream"),
        JETSERVE_FALLBACK_QUEUE_WAIT=str(QUEUE_WAIT_S),
    )
    try:
        api = stack.start_api(env=env, wait=False)
        api.metrics_headers = auth("ops")
        api.wait_http("/health")
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> str:
    return tiny_llama.name


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def fallbacks(stack: Stack, reason: str) -> float:
    return stack.api.metric("jetserve:fallback_requests_total", reason=reason, outcome="ok")


def served_upstream(upstream: Stack) -> float:
    return upstream.api.metric("jetserve:usage_requests_total", key_id="key_upstream")


def greedy(c: openai.OpenAI, model: str, stream: bool = False) -> str:
    kwargs = dict(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    if not stream:
        return c.completions.create(**kwargs).choices[0].text
    chunks = c.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    return "".join(ch.choices[0].text for ch in chunks if ch.choices)


def test_no_worker_sends_requests_to_the_fallback(
    primary: Stack, upstream: Stack, model: str
) -> None:
    direct = greedy(client(upstream.api.url, secret("upstream")), model)
    before = served_upstream(upstream)
    via_primary = client(primary.api.url, secret("client"))
    assert greedy(via_primary, model) == direct
    assert greedy(via_primary, model, stream=True) == direct
    chat = via_primary.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.choices[0].message.content is not None
    assert fallbacks(primary, "no_worker") == 3
    assert served_upstream(upstream) == before + 3  # the upstream really served them
    log = [e for e in primary.api.log_events() if e.get("event") == "fallback_request"]
    assert [e["reason"] for e in log] == ["no_worker"] * 3
    usage = [e for e in primary.api.log_events() if e.get("event") == "usage"]
    assert usage[-1]["route"] == "fallback" and usage[-1]["key_id"] == "key_client"
    assert usage[0]["completion_tokens"] == 12  # metered from the upstream's usage
    # The client's key still matters: the fallback is not an open proxy.
    with pytest.raises(openai.AuthenticationError):
        greedy(client(primary.api.url, "sk-wrong-0123456789abcdef"), model)


def test_a_worker_coming_back_takes_the_requests_again(primary: Stack, model: str) -> None:
    primary.start_worker("--max-num-seqs", "1")
    primary.api.wait_http("/ready")
    before = fallbacks(primary, "no_worker")
    local_before = primary.api.metric("jetserve:usage_requests_total", route="local")
    out = greedy(client(primary.api.url, secret("client")), model)
    assert out
    assert fallbacks(primary, "no_worker") == before
    assert primary.api.metric("jetserve:usage_requests_total", route="local") == local_before + 1
    assert primary.worker.metric("jetserve:generation_tokens_total") >= 12


async def test_a_long_queue_wait_diverts_until_it_drains(primary: Stack, model: str) -> None:
    """One job at a time on the worker; a backlog of long jobs makes the head-of-line
    wait grow past the threshold, then drains. The backlog is sized for a fast engine:
    the queue's head has waited k jobs' time when k have run, and six 400-token jobs of
    the tiny model drained before the API's gauge saw a second's wait once a batch-1
    decode step took well under a millisecond."""
    bus = await BusClient.connect(primary.nats_url, model)
    try:
        jobs = [bus.make_job([1, 2, 3], max_tokens=400, ignore_eos=True) for _ in range(16)]
        for job in jobs:
            await bus.submit(job)
        await asyncio.to_thread(
            wait_until,
            lambda: (
                primary.api.metric("jetserve:queue_head_wait_seconds", model_name=model)
                > QUEUE_WAIT_S
            ),
            timeout=20,
        )
        c = client(primary.api.url, secret("client"))
        assert await asyncio.to_thread(greedy, c, model)
        assert fallbacks(primary, "queue_wait") == 1
        t0 = time.monotonic()
        await asyncio.to_thread(
            wait_until,
            lambda: primary.api.metric("jetserve:queue_head_wait_seconds", model_name=model) == 0,
            timeout=60,
        )
        drained_s = time.monotonic() - t0
        before = primary.api.metric("jetserve:usage_requests_total", route="local")
        assert await asyncio.to_thread(greedy, c, model)
        assert fallbacks(primary, "queue_wait") == 1  # served here again
        assert primary.api.metric("jetserve:usage_requests_total", route="local") == before + 1
        for job in jobs:  # nothing of the backlog was lost
            deltas = await bus.collect(job.id, timeout_s=60)
            assert sum(len(c.token_ids) for d in deltas for c in d.chunks) == 400
        print(f"queue wait over {QUEUE_WAIT_S}s diverted; back to local {drained_s:.1f}s later")
    finally:
        await bus.close()
