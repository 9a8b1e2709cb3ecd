"""Jobs routed to one worker's own subject (prefix routing) keep every durability
guarantee: kill -9 of the chosen worker, a chosen worker too busy to pull, and a
chosen worker that drains. Each job completes exactly once, token-exact."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from shared.bus.subjects import JOBS_STREAM, routed_jobs_subject
from shared.messages import Job, encode_job
from tests.support.faults import Collector, reference_outputs, report, submit_watched, tally_of
from tests.support.polling import wait_for
from tests.support.stack import BusClient, ServiceProcess, Stack

# Fast takeover for the test: redelivery after 2.5 s, registry expiry after 3 s.
FLAGS = ("--ack-wait", "2.5", "--worker-ttl", "3", "--heartbeat-interval", "0.5")
FALLBACK = "0.5"
# The kill -9 test wants each job to start where it was routed: on a loaded CI box a
# worker may take over half a second to pull its first routed jobs, and then the
# fallback (rightly) moves them; a longer bound keeps the test about the kill.
KILL_TEST_FALLBACK = "3"
PROMPTS = [[1, 20, 31, 42, 53, 64, 75], [1, 5, 6, 7, 8, 9], [1, 99, 98, 97]]


async def route(bus: BusClient, job: Job, worker_id: str) -> None:
    """Publish as the API's router does: to the chosen worker's subject."""
    await bus.js.publish(
        routed_jobs_subject(bus.model, worker_id),
        encode_job(job),
        stream=JOBS_STREAM,
        headers={"Nats-Msg-Id": job.id},
    )


def worker_id_of(svc: ServiceProcess, statuses) -> str:
    return next(s.worker_id for s in statuses if s.worker_id.startswith(svc.name + "-"))


def greedy_jobs(bus: BusClient, n: int, max_tokens: int) -> list[Job]:
    return [
        bus.make_job(PROMPTS[i % 3], max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for i in range(n)
    ]


def pulled(svc: ServiceProcess, queue: str) -> float:
    return svc.metric("jetserve:jobs_pulled_total", queue=queue)


def fallbacks(svc: ServiceProcess, reason: str) -> float:
    return svc.metric("jetserve:routed_fallbacks_total", reason=reason)


async def test_routed_jobs_survive_kill9_of_their_worker(
    bus_stack: Stack, bus: BusClient, tiny_llama: Path
) -> None:
    bound = ("--route-fallback", KILL_TEST_FALLBACK)
    chosen = bus_stack.start_worker(*FLAGS, "--max-num-seqs", "8", *bound)
    other = bus_stack.start_worker(*FLAGS, "--max-num-seqs", "8", *bound)
    chosen_id = worker_id_of(chosen, await bus.workers())
    jobs = greedy_jobs(bus, 6, max_tokens=160)
    expected, collectors = await submit_watched(
        bus, tiny_llama, jobs, timeout_s=120, send=lambda job: route(bus, job, chosen_id)
    )

    # Kill once every job has started: a job still waiting in the chosen worker's
    # pull (a loaded box admits the six over a few steps) would start on the survivor,
    # correctly, but then it says nothing about a routed job surviving its worker.
    await wait_for(
        lambda: collectors[0].num_tokens >= 20 and all(c.num_tokens for c in collectors),
        timeout_s=60,
    )
    assert all(c.deltas[0].worker_id == chosen_id for c in collectors)  # ran where routed
    chosen.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    chosen.proc.wait(10)

    await asyncio.gather(*(c.wait() for c in collectors))
    tally = tally_of(collectors, expected)
    interrupted = [c for c in collectors if c.deltas[-1].worker_id != chosen_id]
    recovery = [c.first_time_from(other.name + "-", killed_at) - killed_at for c in interrupted]
    report(
        "routed_kill9",
        f"{tally.line()}; {len(interrupted)} routed jobs taken over, recovery max "
        f"{max(recovery):.2f}s (ack_wait 2.5 s, worker ttl 3 s)",
    )
    tally.assert_exact()
    assert interrupted, "the kill came too late: no job was interrupted"
    # They reached the survivor through the shared queue: moved once their deliveries
    # timed out (`redelivered`), or once the dead worker left the registry (`worker_gone`),
    # whichever the survivor's sweep saw first.
    moved = fallbacks(other, "redelivered") + fallbacks(other, "worker_gone")
    assert moved >= len(interrupted)
    resumed = {e["job_id"] for e in other.log_events() if e.get("event") == "job_resumed"}
    assert resumed >= {c.job.id for c in interrupted}


async def test_a_worker_that_stops_pulling_strands_no_routed_job(
    bus_stack: Stack, bus: BusClient, tiny_llama: Path
) -> None:
    """The chosen worker is frozen (SIGSTOP) while still live in the registry: jobs routed
    to it move to the shared queue after --route-fallback and run once, on the other
    worker; thawed, it runs none of them again."""
    # The frozen worker's last lingering pull may take one job with it: that delivery
    # comes back after --ack-wait (2.5 s here) and is moved as `redelivered`.
    flags = ("--route-fallback", FALLBACK, "--ack-wait", "2.5")
    stuck = bus_stack.start_worker(*flags)
    other = bus_stack.start_worker(*flags)
    stuck_id = worker_id_of(stuck, await bus.workers())
    jobs = greedy_jobs(bus, 4, max_tokens=24)
    expected = reference_outputs(tiny_llama, jobs)
    collectors = [Collector(job).start(bus, timeout_s=60) for job in jobs]
    stuck.signal(signal.SIGSTOP)
    try:
        sent = time.monotonic()
        for job in jobs:
            await route(bus, job, stuck_id)
        await asyncio.gather(*(c.wait() for c in collectors))
        waited = max(c.times[0] for c in collectors) - sent
    finally:
        stuck.signal(signal.SIGCONT)
    await asyncio.sleep(2.0)  # thawed: anything it still held would run now

    tally = tally_of(collectors, expected)
    for c in collectors:
        assert {d.worker_id for d in c.deltas} == {c.deltas[0].worker_id}  # one run each
        assert c.deltas[0].worker_id.startswith(other.name + "-")
    report("routed_stuck_fallback", f"{tally.line()}; last first token {waited:.2f}s after submit")
    tally.assert_exact()
    # Moved while the stuck worker was still registered (its ttl is 10 s).
    moved = fallbacks(other, "not_pulled") + fallbacks(other, "redelivered")
    assert moved == len(jobs) and fallbacks(other, "not_pulled") >= len(jobs) - 1
    assert waited < 10.0
    # Thawed, the stuck worker ran none of them (a delivery it held is stale: moved, a
    # duplicate the server drops).
    assert stuck.metric("jetserve:generation_tokens_total") == 0


async def test_a_draining_worker_hands_its_routed_jobs_to_the_shared_queue(
    bus_stack: Stack, bus: BusClient, tiny_llama: Path
) -> None:
    chosen = bus_stack.start_worker("--max-num-seqs", "2", "--drain-timeout", "0.5")
    other = bus_stack.start_worker()
    chosen_id = worker_id_of(chosen, await bus.workers())
    jobs = greedy_jobs(bus, 5, max_tokens=300)
    expected, collectors = await submit_watched(
        bus, tiny_llama, jobs, timeout_s=120, send=lambda job: route(bus, job, chosen_id)
    )
    await wait_for(lambda: collectors[0].num_tokens >= 5, timeout_s=60)
    chosen.signal(signal.SIGTERM)
    assert chosen.proc.wait(30) == 0
    await asyncio.gather(*(c.wait() for c in collectors))
    tally = tally_of(collectors, expected)
    tally.assert_exact()
    moved = [e for e in chosen.log_events() if e.get("event") == "routed_job_moved"]
    assert moved and all(e["reason"] == "drain" for e in moved)
    assert all(c.deltas[-1].worker_id.startswith(other.name + "-") for c in collectors[2:])
