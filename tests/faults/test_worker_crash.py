"""kill -9 of a worker mid-stream: its jobs continue on another worker, token-exact.

The killed worker's jobs are redelivered after ack_wait; the worker that takes one over
reads the Deltas already stored, re-prefills prompt + produced tokens and continues, so
the job's stream has no duplicated and no missing token, and for greedy and seeded
sampling the text equals an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.support.faults import report, submit_watched, takeover, worker_of
from tests.support.polling import wait_for
from tests.support.stack import BusClient, Stack

ACK_WAIT = "2.5"
PROMPTS = [[1, 20, 31, 42, 53, 64, 75], [1, 5, 6, 7, 8, 9], [1, 99, 98, 97]]


async def test_kill_worker_mid_stream(bus_stack: Stack, bus: BusClient, tiny_llama: Path) -> None:
    flags = ("--max-num-seqs", "8", "--ack-wait", ACK_WAIT)
    workers = [bus_stack.start_worker(*flags) for _ in range(2)]
    jobs = []
    for i in range(8):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2 == 0:
            jobs.append(bus.make_job(prompt, max_tokens=160, temperature=0.0, ignore_eos=True))
        else:  # seeded sampling, n=2 on some: each completion resumes with its own tokens
            jobs.append(
                bus.make_job(
                    prompt,
                    max_tokens=160,
                    temperature=0.8,
                    top_p=0.95,
                    seed=100 + i,
                    n=2 if i % 4 == 1 else 1,
                    presence_penalty=0.3,
                    ignore_eos=True,
                )
            )
    expected, collectors = await submit_watched(bus, tiny_llama, jobs, timeout_s=120)

    # Kill the worker holding the first job once it has streamed part of it.
    first = collectors[0]
    await wait_for(lambda: first.num_tokens >= 20, timeout_s=60)
    holder = first.deltas[-1].worker_id
    doomed = worker_of(workers, holder)
    survivor = next(w for w in workers if w is not doomed)
    doomed.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    doomed.proc.wait(10)

    await asyncio.gather(*(c.wait() for c in collectors))
    # Interrupted: started on the killed worker, finished on the survivor.
    after = takeover(collectors, expected, holder, survivor.name + "-", killed_at)
    unfinished, tally, recovery = after.unfinished, after.tally, after.recovery
    report(
        "worker_kill9",
        f"{tally.line()}; {len(unfinished)} jobs interrupted mid-stream; recovery "
        f"(kill -> first token from the survivor) max {max(recovery):.2f}s "
        f"(ack_wait {ACK_WAIT}s)",
    )
    tally.assert_exact()
    assert unfinished, "the kill came too late: no job was interrupted"
    for c in unfinished:
        assert c.deltas[-1].worker_id.startswith(survivor.name + "-")
        assert c.deltas[-1].usage.completion_tokens == sum(len(t) for t in c.tokens().values())
    resumed = [e for e in survivor.log_events() if e.get("event") == "job_resumed"]
    assert {e["job_id"] for e in resumed} >= {c.job.id for c in unfinished}
    assert all(e["produced_tokens"] > 0 for e in resumed)
    assert survivor.alive
