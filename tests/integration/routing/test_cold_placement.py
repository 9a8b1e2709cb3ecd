"""`--routing-cold place` end to end (two workers, one API over HTTP): a prompt no worker
holds goes to a worker's own subject, not the shared queue, and a burst of prompts on one
new system prompt converges on the worker the first was sent to, before any of them was
announced or computed."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.stack import ServiceProcess, Stack

pytestmark = pytest.mark.integration

SYSTEM = [3 + (i * 53) % 240 for i in range(300)]  # 300 tokens: 18 full blocks of 16


@pytest.fixture(scope="module")
def placing(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    stack = Stack.create(tmp_path_factory.mktemp("placing") / "stack", tiny_llama)
    try:
        for _ in range(2):
            stack.start_worker("--block-size", "16")
        stack.start_api("--routing", "prefix", "--routing-cold", "place")
        yield stack
    finally:
        stack.close()


def complete(api: ServiceProcess, prompt: list[int]) -> dict:
    model = httpx.get(f"{api.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    resp = httpx.post(f"{api.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def pulled(worker: ServiceProcess, queue: str) -> float:
    return worker.metric("jetserve:jobs_pulled_total", queue=queue)


def test_a_cold_burst_is_placed_on_one_worker_not_the_shared_queue(placing: Stack) -> None:
    api = placing.api
    prompts = [[*SYSTEM, 200 + u, 7, 8 + u] for u in range(3)]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda p: complete(api, p), prompts))
    assert all(r["usage"]["prompt_tokens"] == 303 for r in replies)
    # The first was placed (nobody held it); the two others were predicted cached where
    # it went: 288 tokens saved outweigh one or two more running jobs (64 tokens each).
    assert api.metric("jetserve:routing_decisions_total", decision="placed") == 1
    assert api.metric("jetserve:routing_decisions_total", decision="routed") == 2
    assert api.metric("jetserve:routing_decisions_total", decision="cold") == 0
    assert api.metric("jetserve:routing_cached_tokens_total") == 2 * 288
    counts = sorted(pulled(w, "routed") for w in placing.workers)
    assert counts == [0, 3]
    assert sum(pulled(w, "shared") for w in placing.workers) == 0
