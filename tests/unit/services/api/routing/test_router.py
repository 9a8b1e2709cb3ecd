"""The router's choice: most cached prefix unless the load term outweighs it; cold
prompts to the shared queue, or with cold="place" to the least loaded worker, counting
what it sent there as cached; the same view gives the same choice on every replica."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def chat(system: int, user: int, turns: int = 1) -> list[int]:
    """A prompt: 64 tokens of system prompt `system`, then 48 per turn of user `user`."""
    out = [1000 + system * 100 + i for i in range(64)]
    for t in range(turns):
        out += [5000 + user * 400 + t * 48 + i for i in range(48)]
    return out


def test_place_sends_a_cold_prompt_to_the_least_loaded_worker() -> None:
    reg = registry(a={"num_running": 2}, b={}, c={"num_waiting": 1})
    d = Router(index_with(), reg, cold="place").choose(MODEL, PROMPT, job_id="j")
    assert (d.decision, d.worker_id, d.cached_tokens) == ("placed", "b", 0)
    assert d.subject == routed_jobs_subject(MODEL, "b")
    # Equal loads: the rendezvous order of the first block, the same on every replica.
    idle = registry(a={}, b={}, c={})
    picks = {Router(index_with(), idle, cold="place").choose(MODEL, PROMPT).worker_id for _ in "xy"}
    assert len(picks) == 1
    with pytest.raises(ValueError):
        Router(index_with(), idle, cold="nearest")


def test_place_converges_a_burst_on_one_system_prompt_until_load_outweighs_it() -> None:
    router = Router(PrefixIndex(), registry(a={}, b={}, c={}), load_tokens=64, cold="place")
    first = router.choose(MODEL, chat(0, 0), job_id="u0")
    assert first.decision == "placed"
    # Nobody announced a block yet, but the router knows where it sent the system prompt.
    second = router.choose(MODEL, chat(0, 1), job_id="u1")
    assert (second.decision, second.worker_id, second.cached_tokens) == (
        "routed",
        first.worker_id,
        64,
    )
    assert router.pending_blocks(first.worker_id) == 8  # 4 system blocks + 2 per user
    # Another system prompt goes where the load is lowest, not after the first one.
    other = router.choose(MODEL, chat(1, 2), job_id="u2")
    assert other.worker_id != first.worker_id
    # 64 tokens saved weigh less than a worker with one more running job than another idle
    # one: the load term still spreads.
    third = router.choose(MODEL, chat(0, 3), job_id="u3")
    assert third.worker_id not in (first.worker_id, other.worker_id)
    for job in ("u0", "u1", "u2", "u3"):
        router.finished(job)
    assert all(router.pending_blocks(w) == 0 for w in "abc")


def test_pending_blocks_expire_for_jobs_never_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    import services.api.routing.router as router_module

    router = Router(PrefixIndex(), registry(a={}, b={}), cold="place")
    worker = router.choose(MODEL, chat(0, 0), job_id="never-followed").worker_id
    assert router.pending_blocks(worker) == 6  # 112 tokens: 6 reusable blocks
    later = time.time() + router_module.PENDING_TTL_S + 1
    monkeypatch.setattr(router_module.time, "time", lambda: later)
    router.choose(MODEL, chat(1, 1), job_id="next")
    assert sum(router.pending_blocks(w) for w in "ab") == 6  # only "next"'s blocks


def test_announced_and_pending_blocks_chain_into_one_prefix() -> None:
    """The index holds the first blocks, the router sent the rest: the match spans both."""
    prompt = chat(0, 0, turns=3)  # 64 + 144 tokens: 12 reusable blocks
    hashes = full_block_hashes(prompt, BS, 12)
    index = PrefixIndex()
    index.apply_events(KvEvents("a", 1, 1, hashes[:4], [], BS))
    router = Router(index, registry(a={}, b={}), cold="place")
    assert router.choose(MODEL, chat(0, 0, turns=2), job_id="t1").worker_id == "a"
    d = router.choose(MODEL, prompt, job_id="t2")
    assert (d.worker_id, d.cached_tokens) == ("a", 9 * BS)  # 4 announced + 5 sent with t1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 5), st.integers(1, 3)),
        min_size=1,
        max_size=40,
    )
)
def test_place_never_goes_cold_and_leaks_no_pending_blocks(ops) -> None:
    """Any mix of jobs and finishes: every job goes to a live worker's subject, the
    predicted hit never exceeds what the prompt can reuse, and once every job finished no
    block counts as pending anywhere."""
    router = Router(PrefixIndex(), registry(a={}, b={}, c={}), cold="place")
    open_jobs: list[str] = []
    for n, (finish, system, user, turns) in enumerate(ops):
        if finish and open_jobs:
            router.finished(open_jobs.pop(system % len(open_jobs)))
            continue
        prompt = chat(system, user, turns)
        d = router.choose(MODEL, prompt, job_id=f"j{n}")
        assert d.decision in ("routed", "placed")
        assert d.subject == routed_jobs_subject(MODEL, d.worker_id)
        assert 0 <= d.cached_tokens <= (len(prompt) - 1) // BS * BS
        assert (d.decision == "placed") == (d.cached_tokens == 0)
        open_jobs.append(f"j{n}")
    for job in open_jobs:
        router.finished(job)
    assert all(router.pending_blocks(w) == 0 for w in "abc")
