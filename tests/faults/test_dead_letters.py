"""A poison job that crashes every worker ends in LLM_DEAD, and replays after a fix.

The test plays the poison: whichever worker is running the job is killed with SIGKILL,
run after run. After `max_deliver` runs the next delivery is not run but moved to
LLM_DEAD with its reason and the job's stream is closed with an error; `jetserve dead
list` shows it, `jetserve dead replay` queues it again and the job continues after the
tokens it had produced, ending with the text of an uninterrupted run. The janitor that
covers a message the server stopped delivering is tested on its own at the end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats

from engine_worker.worker.janitor import Janitor
from shared.bus.dead_letters import HDR_REASON, list_dead_letters
from shared.bus.jetstream import ensure_jobs_consumer, ensure_streams
from shared.bus.job_events import read_history
from shared.bus.subjects import DEAD_STREAM, JOBS_STREAM, consumer_name, events_subject
from shared.messages import decode_delta
from shared.settings import BusSettings
from tests.support.faults import Collector, Tally, reference_outputs, report, worker_of
from tests.support.nats_process import NatsServer
from tests.support.polling import wait_for
from tests.support.stack import REPO_ROOT, BusClient, Stack

ACK_WAIT = "2.5"
MAX_DELIVER = 2


async def _queue_empty(bus: BusClient) -> bool:
    return await bus.jobs_in_stream() == 0


def jetserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_poison_job_is_dead_lettered_then_replayed(
    bus_stack: Stack, bus: BusClient, tiny_llama: Path
) -> None:
    flags = ("--ack-wait", ACK_WAIT, "--max-deliver", str(MAX_DELIVER))
    workers = [bus_stack.start_worker(*flags) for _ in range(2)]
    poison = bus.make_job([1, 20, 31, 42], max_tokens=400, temperature=0.0, ignore_eos=True)
    normal = [bus.make_job([1, 5, 6, i], max_tokens=20, temperature=0.0) for i in range(7, 11)]
    expected = reference_outputs(tiny_llama, [poison, *normal])
    first = Collector(poison).start(bus, timeout_s=120)
    normal_collectors = [Collector(job).start(bus, timeout_s=120) for job in normal]
    await bus.submit(poison)
    for job in normal:
        await bus.submit(job)

    # Jobs that share a worker with the poison when it crashes lose a delivery too (they
    # run again elsewhere, and would be dead-lettered as well after max_deliver crashes):
    # here they finish before the first crash.
    await asyncio.gather(*(c.wait() for c in normal_collectors))
    # Every run of the poison job kills the worker running it.
    killed_at = 0.0

    def live_holder() -> Any:
        """The live worker that wrote the newest Delta read so far (the reader may still be
        catching up on Deltas that a killed worker stored before it died)."""
        holder = first.deltas[-1].worker_id if first.deltas else ""
        return worker_of(workers, holder)

    for _ in range(MAX_DELIVER):
        seen = len(first.deltas)
        await wait_for(
            lambda s=seen: len(first.deltas) > s + 3 and live_holder() is not None,
            timeout_s=60,
        )
        victim = live_holder()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        killed_at = time.monotonic()
        workers.remove(victim)
        if not workers:  # keep one worker around for the next delivery
            workers.append(bus_stack.start_worker(*flags))
    await first.wait()
    dead_after = time.monotonic() - killed_at
    closing = first.deltas[-1]
    assert closing.finished and closing.error and closing.error.startswith("dead-lettered")
    produced = first.num_tokens
    assert 0 < produced < 400

    letters = await list_dead_letters(bus.js)
    assert [x.job_id for x in letters] == [poison.id]
    assert letters[0].deliveries == MAX_DELIVER and "without finishing" in letters[0].reason
    # It leaves the work queue: the worker terminates the message once the closing Delta is
    # stored, so the termination may land just after the Delta is read.
    await wait_for(lambda: _queue_empty(bus), timeout_s=10)
    listed = jetserve("dead", "list", "--json", "--nats-url", bus_stack.nats_url)
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["job_id"] == poison.id and row["tokens_produced"] == produced

    # "The fix": workers no longer die. Replay it; it continues where it stopped.
    replayed_at = time.monotonic()
    out = jetserve("dead", "replay", "--id", poison.id, "--nats-url", bus_stack.nats_url)
    assert out.returncode == 0 and f"replayed {poison.id}" in out.stdout, out.stderr
    again = Collector(poison).start(bus, timeout_s=90, past_errors=True)
    await again.wait()
    replay_s = time.monotonic() - replayed_at
    assert await list_dead_letters(bus.js) == []
    assert jetserve("dead", "list", "--nats-url", bus_stack.nats_url).stdout.strip() == (
        "no dead-lettered jobs"
    )
    history = await read_history(bus.js, poison.id)
    assert history.terminal and history.token_ids == expected[poison.id]
    # One continuous log: the error Delta sits between the runs, nothing repeated or lost.
    tally = Tally()
    tally.add(again.deltas, expected[poison.id], poison.id)
    for c in normal_collectors:
        tally.add(c.deltas, expected[c.job.id], c.job.id)
    report(
        "poison_dead_letter",
        f"{tally.line()}; poison ran {MAX_DELIVER}x ({produced} tokens), dead-lettered "
        f"{dead_after:.2f}s after the last crash (ack_wait {ACK_WAIT}s), replay completed "
        f"in {replay_s:.2f}s",
    )
    tally.assert_exact()
    errors = [d for d in again.deltas if d.error]
    assert len(errors) == 1 and errors[0].seq < again.deltas[-1].seq


async def test_janitor_moves_a_message_the_server_stopped_delivering(
    nats_server: NatsServer,
) -> None:
    """The last delivery's worker died: nobody is left to dead-letter it on receipt."""
    settings = BusSettings(ack_wait_s=1.0, max_deliver=0)  # the consumer allows 1 delivery
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, settings)
    await ensure_jobs_consumer(js, "m", settings)
    bus = BusClient(nc, "m")
    job_a, job_b = bus.make_job([1, 2], n=2), bus.make_job([3, 4])
    log = _Log()
    janitor = Janitor(nc, js, "m", "janitor-test", 60.0, 5.0, log)
    await janitor.start()  # listens for the MAX_DELIVERIES advisory
    try:
        sub = await js.pull_subscribe_bind(durable=consumer_name("m"), stream=JOBS_STREAM)
        await bus.submit(job_a)
        (msg,) = await sub.fetch(1, timeout=5)  # delivered, never acked: a dead worker
        # The janitor's move is three writes: the dead letter, the delete from LLM_JOBS,
        # the job's closing Delta. Wait for the last one, not the first, before reading.
        await wait_for(lambda: _closed(js, job_a.id), timeout_s=15)
        assert await _dead_count(js, 1)
        assert await bus.jobs_in_stream() == 0
        closing = decode_delta((await js.get_last_msg("LLM_EVENTS", events_subject(job_a.id))).data)
        assert closing.finished and closing.error.startswith("dead-lettered")
        assert [c.index for c in closing.chunks] == [0, 1]
        # Without the advisory (nobody listened when it fired), the sweep finds it.
        await janitor.stop()
        await bus.submit(job_b)
        (msg,) = await sub.fetch(1, timeout=5)
        await asyncio.sleep(2.0)  # past ack_wait: undeliverable now
        assert await janitor.sweep() == 0  # seen once: only a suspect
        assert await janitor.sweep() == 1
        letters = await list_dead_letters(js)
        assert [x.job_id for x in letters] == [job_a.id, job_b.id]
        assert await bus.jobs_in_stream() == 0
        raw = await js.get_msg(DEAD_STREAM, seq=letters[1].dead_seq)
        assert "without finishing" in raw.headers[HDR_REASON]
        assert [e for e in log.events if e == "job_dead_lettered"] == ["job_dead_lettered"] * 2
        del msg
    finally:
        await janitor.stop()
        await nc.close()


async def _dead_count(js, n: int) -> bool:
    return len(await list_dead_letters(js)) >= n


async def _closed(js, job_id: str) -> bool:
    """The job's stream in LLM_EVENTS ends with a finished Delta."""
    return (await read_history(js, job_id)).finished


class _Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def warning(self, event: str, **_: object) -> None:
        self.events.append(event)

    info = warning
