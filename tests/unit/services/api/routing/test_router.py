"""The router's choice: most cached prefix unless the load term outweighs it; cold
prompts to the shared queue; the same view gives the same choice on every replica."""

from __future__ import annotations

import time

import pytest

from services.api.model_registry import ModelRegistry, WorkerEntry
from services.api.routing.prefix_index import PrefixIndex
from services.api.routing.router import Router
from shared.bus.kv_events import KvEvents
from shared.bus.subjects import jobs_subject, routed_jobs_subject
from shared.bus.worker_registry import WorkerStatus
from shared.kv_blocks import full_block_hashes

pytestmark = pytest.mark.unit

MODEL, BS = "m", 16
PROMPT = list(range(1, 161))  # 160 tokens: 9 reusable full blocks


def registry(**loads: dict) -> ModelRegistry:
    reg = ModelRegistry(js=None)  # type: ignore[arg-type]  # never started: no NATS here
    for worker_id, load in loads.items():
        status = WorkerStatus(
            worker_id=worker_id,
            model=MODEL,
            capacity=64,
            max_model_len=4096,
            block_size=BS,
            routed_subject=routed_jobs_subject(MODEL, worker_id),
            updated_at=time.time(),
            **load,
        )
        reg.workers[status.key] = WorkerEntry(status.key, status, time.monotonic())
    return reg


def index_with(**held: int) -> PrefixIndex:
    """Each worker holds the first `n` blocks of PROMPT."""
    index = PrefixIndex()
    for worker_id, n in held.items():
        index.apply_events(KvEvents(worker_id, 1, 1, full_block_hashes(PROMPT, BS)[:n], [], BS))
    return index


def test_the_worker_holding_the_prefix_wins() -> None:
    router = Router(index_with(a=2, b=8), registry(a={}, b={}))
    d = router.choose(MODEL, PROMPT)
    assert (d.decision, d.worker_id, d.cached_tokens) == ("routed", "b", 8 * BS)
    assert d.subject == routed_jobs_subject(MODEL, "b")


def test_load_outweighs_a_small_saving_but_not_a_large_one() -> None:
    busy = {"num_running": 4, "num_waiting": 2}
    small = Router(index_with(a=1, b=2), registry(a={}, b=busy), load_tokens=64)
    assert small.choose(MODEL, PROMPT).worker_id == "a"  # 16 tokens saved < 12 x 64 of load
    large = Router(index_with(a=0, b=9), registry(a={}, b={"num_running": 1}), load_tokens=64)
    assert large.choose(MODEL, PROMPT).worker_id == "b"  # 144 saved > 64


def test_cold_prompts_and_no_routable_worker_go_to_the_shared_queue() -> None:
    assert Router(index_with(), registry(a={}, b={})).choose(MODEL, PROMPT).decision == "cold"
    old = registry(a={})
    next(iter(old.workers.values())).status.routed_subject = ""  # predates routing
    d = Router(index_with(a=9), old).choose(MODEL, PROMPT)
    assert (d.decision, d.subject) == ("no_worker", jobs_subject(MODEL))


def test_replicas_with_the_same_view_agree_even_on_ties() -> None:
    index, reg = index_with(a=5, b=5, c=5), registry(a={}, b={}, c={})
    picks = {Router(index, reg).choose(MODEL, PROMPT).worker_id for _ in range(5)}
    assert len(picks) == 1
    other_prompt = [7, *PROMPT[1:]]  # a different first block: its own rendezvous order
    assert Router(index, reg).choose(MODEL, other_prompt).decision == "cold"


def test_a_burst_spreads_once_routed_jobs_add_up_and_finish_releases_them() -> None:
    router = Router(index_with(a=9, b=8), registry(a={}, b={}), load_tokens=64)
    first = [router.choose(MODEL, PROMPT, job_id=f"j{i}").worker_id for i in range(4)]
    assert first[0] == "a" and "b" in first  # a's unseen jobs count as load
    for i in range(4):
        router.finished(f"j{i}")
    assert router.choose(MODEL, PROMPT, job_id="k").worker_id == "a"
