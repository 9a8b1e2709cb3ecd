"""The engine in its own process (--engine-process): when it dies, its worker fails loudly
and another worker finishes the jobs token-exact; when the worker dies, so does it.

kill -9 of the engine process of the worker holding a job mid-stream: that worker logs
`engine_failed` naming the signal, hands its jobs back (nak) and exits with code 1; the
other worker continues each job after its stored Deltas, so no token is lost or
duplicated and the texts equal an uninterrupted run. kill -9 of a worker leaves no
engine process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import nats.errors

from tests.support.engine_process import engine_pid, process_gone, wait_gone
from tests.support.faults import Collector, report, submit_watched, takeover, worker_of
from tests.support.polling import wait_for
from tests.support.stack import BusClient, Stack

ACK_WAIT = "2.5"
PROMPTS = [[1, 20, 31, 42, 53, 64, 75], [1, 5, 6, 7, 8, 9], [1, 99, 98, 97]]


async def test_engine_process_killed_mid_stream(
    bus_stack: Stack, bus: BusClient, tiny_llama: Path
) -> None:
    flags = ("--max-num-seqs", "8", "--ack-wait", ACK_WAIT, "--engine-process")
    workers = [bus_stack.start_worker(*flags) for _ in range(2)]
    jobs = []
    for i in range(6):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2 == 0:
            jobs.append(bus.make_job(prompt, max_tokens=400, temperature=0.0, ignore_eos=True))
        else:
            jobs.append(
                bus.make_job(
                    prompt, max_tokens=400, temperature=0.8, seed=200 + i, n=2, ignore_eos=True
                )
            )
    expected, collectors = await submit_watched(bus, tiny_llama, jobs, timeout_s=120)

    first = collectors[0]
    # Kill at the first token seen: the engine runs ahead of the token plane, and a
    # worker delivers the frames it already read, so on a loaded box a later kill can
    # find every job already computed (the tiny model makes 400 tokens in a second).
    await wait_for(lambda: first.num_tokens >= 1, timeout_s=60)
    holder = first.deltas[-1].worker_id
    doomed = worker_of(workers, holder)
    survivor = next(w for w in workers if w is not doomed)
    os.kill(engine_pid(doomed), signal.SIGKILL)
    killed_at = time.monotonic()
    tokens_at_kill = [c.num_tokens for c in collectors]
    code = await asyncio.to_thread(doomed.proc.wait, 30)
    exited_after = time.monotonic() - killed_at

    await asyncio.gather(*(c.wait() for c in collectors))
    after = takeover(collectors, expected, holder, survivor.name + "-", killed_at)
    unfinished, tally, recovery = after.unfinished, after.tally, after.recovery
    report(
        "engine_process_kill9",
        f"{tally.line()}; worker exited {code} {exited_after:.2f}s after its engine process "
        f"was killed; {len(unfinished)} jobs taken over, first token from the survivor "
        f"after max {max(recovery, default=float('nan')):.2f}s; tokens per job at the kill "
        f"{tokens_at_kill}",
    )
    assert code == 1
    failed = [e for e in doomed.log_events() if e.get("event") == "engine_failed"]
    assert len(failed) == 1 and "signal SIGKILL" in failed[0]["error"]
    tally.assert_exact()
    assert unfinished, "the kill came too late: no job was interrupted"
    for c in unfinished:
        assert c.deltas[-1].worker_id.startswith(survivor.name + "-")
    assert survivor.alive


async def test_worker_kill9_leaves_no_engine_process(bus_stack: Stack, bus: BusClient) -> None:
    worker = bus_stack.start_worker("--engine-process")
    job = bus.make_job([1, 5, 6], max_tokens=500, temperature=0.0, ignore_eos=True)
    collector = Collector(job).start(bus, timeout_s=60)
    await bus.submit(job)
    await wait_for(lambda: collector.num_tokens >= 5, timeout_s=60)  # mid-step, busy
    child = engine_pid(worker)
    assert not process_gone(child)
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)
    gone = await asyncio.to_thread(wait_gone, child, 15.0)
    collector.cancel()
    # The collector only showed the job running; its own end, cancelled or out of time
    # (its budget counts the worker's start, slow on a loaded box), is not what is tested.
    with contextlib.suppress(asyncio.CancelledError, nats.errors.TimeoutError):
        await collector.wait()
    assert gone, f"engine process {child} outlived its worker"
