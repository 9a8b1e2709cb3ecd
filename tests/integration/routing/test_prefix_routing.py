"""Prefix routing end to end (secured NATS, two workers, API replicas over HTTP): a
prompt whose prefix one worker holds goes to that worker from every replica (cold prompts
to the shared queue here, `--routing-cold queue`); with --routing queue jobs go to the
shared queue as before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.stack import ServiceProcess, Stack

pytestmark = pytest.mark.integration

SYSTEM = [3 + (i * 37) % 240 for i in range(100)]  # 100 tokens: 6 full blocks of 16


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    stack = Stack.create(tmp_path_factory.mktemp("routing") / "stack", tiny_llama, secured=True)
    try:
        for _ in range(2):
            stack.start_worker("--block-size", "16")
        # Cold prompts to the shared queue (the default places them: test_cold_placement.py).
        stack.start_api("--routing", "prefix", "--routing-cold", "queue")
        stack.start_api("--routing", "prefix", "--routing-cold", "queue")
        stack.start_api("--routing", "queue")
        yield stack
    finally:
        stack.close()


def complete(api: ServiceProcess, prompt: list[int]) -> dict:
    body = {"model": api_model(api), "prompt": prompt, "max_tokens": 4, "temperature": 0}
    resp = httpx.post(f"{api.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def api_model(api: ServiceProcess) -> str:
    return httpx.get(f"{api.url}/v1/models", timeout=10).json()["data"][0]["id"]


def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def pulled(worker: ServiceProcess, queue: str) -> float:
    return worker.metric("jetserve:jobs_pulled_total", queue=queue)


def test_two_replicas_route_the_same_prefix_to_the_worker_that_holds_it(routed: Stack) -> None:
    api0, api1, _ = routed.apis
    complete(api0, SYSTEM)  # cold: shared queue, lands on one worker
    assert api0.metric("jetserve:routing_decisions_total", decision="cold") == 1
    holder = next(w for w in routed.workers if pulled(w, "shared") == 1)
    other = next(w for w in routed.workers if w is not holder)
    # Both replicas learn the holder's blocks from its events.
    for api in (api0, api1):
        wait_until(lambda a=api: a.metric("jetserve:kv_index_blocks") >= 6)

    for i in range(3):
        for api in (api0, api1):
            reply = complete(api, [*SYSTEM, 250 - i, 7 + i])
            cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= 96, reply["usage"]  # the engine did find the prefix there
    for api in (api0, api1):
        assert api.metric("jetserve:routing_decisions_total", decision="routed") == 3
        assert api.metric("jetserve:routing_cached_tokens_total") == 3 * 96
    assert pulled(holder, "routed") == 6 and pulled(other, "routed") == 0
    # Every identity stayed within its NATS permissions (events, snapshots, moves).
    violations = [
        line for line in routed.nats.log_path.read_text().splitlines() if "Violation" in line
    ]
    assert not violations, violations[:3]


def test_routing_off_publishes_to_the_shared_queue_as_before(routed: Stack) -> None:
    queue_api = routed.apis[2]
    before = sum(pulled(w, "shared") for w in routed.workers)
    routed_before = sum(pulled(w, "routed") for w in routed.workers)
    reply = complete(queue_api, [*SYSTEM, 11, 12])
    assert reply["choices"][0]["finish_reason"] == "length"
    assert sum(pulled(w, "shared") for w in routed.workers) == before + 1
    assert sum(pulled(w, "routed") for w in routed.workers) == routed_before
    decisions = [s for s in queue_api.metrics() if s[0] == "jetserve:routing_decisions_total"]
    assert decisions == []
