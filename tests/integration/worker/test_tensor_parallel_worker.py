"""`jetserve worker --tensor-parallel-size 2` against a real nats-server: one consumer of
the queue serving jobs with its model split over two rank processes, token-identical to
one rank; a dead rank fails the worker loudly, and no rank outlives its worker."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams
from tests.integration.worker.test_worker import PROMPT, check_well_formed, wait_until
from tests.support.stack import BusClient, ServiceProcess, Stack, tokens_by_index


def rank_pids(worker: ServiceProcess) -> list[int]:
    """The worker's child processes running a tensor-parallel rank."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == worker.proc.pid and b"engine_worker.engine.parallel.rank_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


async def test_tp2_worker_serves_jobs_like_one_rank(bus_stack: Stack, bus: BusClient) -> None:
    worker = bus_stack.start_worker("--tensor-parallel-size", "2")
    (rank,) = rank_pids(worker)
    jobs = [
        bus.make_job(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True),
        bus.make_job(PROMPT[:3], max_tokens=9, temperature=0.0, ignore_eos=True),
    ]
    for job in jobs:
        await bus.submit(job)
    deltas = [await bus.collect(job.id) for job in jobs]
    for job_deltas in deltas:
        check_well_formed(job_deltas)
    got = [tokens_by_index(job_deltas) for job_deltas in deltas]

    want = LLM(str(bus_stack.model_dir)).generate(
        [PROMPT, PROMPT[:3]],
        [
            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
        ],
    )
    assert got == [{0: r.outputs[0].token_ids} for r in want]
    assert len(await bus.workers()) == 1  # one worker in the registry, not one per rank

    assert worker.stop() == 0  # SIGTERM: drains, stops its rank
    await wait_until(lambda: not alive(rank), timeout_s=15)


async def test_a_dead_rank_fails_the_worker_and_hands_its_job_back(
    bus_stack: Stack, bus: BusClient
) -> None:
    worker = bus_stack.start_worker("--tensor-parallel-size", "2")
    (rank,) = rank_pids(worker)
    job = bus.make_job(PROMPT, max_tokens=400, temperature=0.0, ignore_eos=True)
    await bus.submit(job)
    seen = []
    async for delta in bus.deltas(job.id, timeout_s=60):
        seen.append(delta)
        break  # it is running
    os.kill(rank, signal.SIGKILL)
    code = worker.proc.wait(60)
    assert code == 1
    (failed,) = [e for e in worker.log_events() if e.get("event") == "engine_failed"]
    # Mid-step or idle, the error names the rank that died.
    assert failed["error"].startswith(f"tensor-parallel rank 1 (pid {rank}) exited with code -9")
    # Handed back (nak), not lost: a healthy one-rank worker finishes it.
    bus_stack.start_worker()
    deltas = await bus.collect(job.id, timeout_s=120)
    assert len(tokens_by_index(deltas)[0]) == 400
    assert seen


async def test_a_killed_worker_leaves_no_rank_behind(bus_stack: Stack) -> None:
    worker = bus_stack.start_worker("--tensor-parallel-size", "2")
    (rank,) = rank_pids(worker)
    worker.kill()  # SIGKILL: no shutdown code runs
    await wait_until(lambda: not alive(rank), timeout_s=15)  # rank 1 noticed, and left
