"""--stream-interval N on real workers: a job's Deltas carry N tokens at a time (its first
and last at once), token-exact against Hugging Face; and when the worker is killed with
tokens held, the survivor makes them again, so the stream has no gap and no duplicate."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.support.faults import Collector, Tally, reference_outputs, report
from tests.support.polling import wait_for
from tests.support.stack import BusClient, Stack

# Fast takeover: redelivery after 2.5 s, registry expiry after 3 s.
FLAGS = ("--ack-wait", "2.5", "--worker-ttl", "3", "--heartbeat-interval", "0.5")
INTERVAL = 4
PROMPTS = [[1, 20, 31, 42, 53, 64, 75], [1, 5, 6, 7, 8, 9], [1, 99, 98, 97]]


@pytest.mark.parametrize("engine", ["thread", "process"])
async def test_deltas_carry_bursts_and_survive_kill9_with_tokens_held(
    bus_stack: Stack, bus: BusClient, tiny_llama: Path, engine: str
) -> None:
    flags = [*FLAGS, "--stream-interval", str(INTERVAL)]
    if engine == "process":
        flags.append("--engine-process")
    workers = [bus_stack.start_worker(*flags) for _ in range(2)]
    jobs = [
        bus.make_job(PROMPTS[i % 3], max_tokens=120, temperature=0.0, ignore_eos=True)
        for i in range(4)
    ]
    expected = reference_outputs(tiny_llama, jobs)
    collectors = [Collector(job).start(bus, timeout_s=120) for job in jobs]
    for job in jobs:
        await bus.submit(job)
    await wait_for(lambda: collectors[0].num_tokens >= 2 * INTERVAL, timeout_s=60)
    holder = collectors[0].deltas[0].worker_id
    victim = next(w for w in workers if holder.startswith(w.name + "-"))
    victim.proc.send_signal(signal.SIGKILL)  # most likely with some tokens held
    victim.proc.wait(10)

    await asyncio.gather(*(c.wait() for c in collectors))
    tally = Tally()
    for c in collectors:
        tally.add(c.deltas, expected[c.job.id], c.job.id)
    report(f"stream_interval_kill9_{engine}", f"{tally.line()} (--stream-interval {INTERVAL})")
    tally.assert_exact()
    taken_over = [c for c in collectors if c.deltas[-1].worker_id != c.deltas[0].worker_id]
    assert taken_over, "the kill came too late: no job was interrupted"
    for c in collectors:
        sizes = [sum(len(ch.token_ids) for ch in d.chunks) for d in c.deltas]
        assert sizes[0] >= 1  # the first token is not held
        # Between the first and the last Delta of each worker's run, every one is a full burst.
        runs: dict[str, list[int]] = {}
        for d, size in zip(c.deltas, sizes, strict=True):
            runs.setdefault(d.worker_id, []).append(size)
        for sizes_here in runs.values():
            assert all(s >= INTERVAL for s in sizes_here[1:-1]), sizes_here
        assert len(c.deltas) <= 2 + 120 // INTERVAL + 2  # about N times fewer Deltas
