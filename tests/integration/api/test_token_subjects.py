"""A submitted job is followed on its replica's step subject, the log only on a loss.

Real nats-server; the test stores Deltas in LLM_EVENTS itself (as a worker would,
fenced), sends the stored ones to the Job's reply_to as a worker does after a step
(`deliver_step`), and reads them through the API's JobClient.
"""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from services.api.jobs.client import CATCH_UP_IDLE_S, JobClient, JobStream
from shared.bus.event_log import Appended, EventLog, append
from shared.bus.jetstream import ensure_streams
from shared.bus.step_delivery import deliver_step
from shared.bus.subjects import EVENTS_STREAM, events_subject, is_steps_subject
from shared.messages import CompletionChunk, Delta, Job, encode_delta
from shared.sampling_params import SamplingParams
from shared.settings import BusSettings

pytestmark = pytest.mark.asyncio


def make_job(job_id: str) -> Job:
    return Job(
        id=job_id,
        model="m",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4),
        created_at=time.time(),
        reply_to=events_subject(job_id),
    )


def delta(job_id: str, seq: int, finished: bool = False) -> bytes:
    chunk = CompletionChunk(
        index=0, token_ids=[10 + seq], finish_reason="length" if finished else None
    )
    return encode_delta(Delta(job_id=job_id, seq=seq, chunks=[chunk], finished=finished))


async def store(js, stream: JobStream, log: EventLog, data: bytes, deliver: bool = True) -> None:
    """Append as the job's owner would, then (unless lost on the way) send it live."""
    assert await append(js, log, data, 5.0) is Appended.STORED
    if deliver:
        assert await deliver_step(js._nc, [(stream.job.reply_to, data)]) == 1


async def collect(stream: JobStream, within_s: float) -> list[int]:
    seqs: list[int] = []

    async def run() -> None:
        async for batch in stream.batches():
            seqs.extend(d.seq for d in batch)

    await asyncio.wait_for(run(), within_s)
    return seqs


async def test_deltas_arrive_on_the_core_subject_without_a_consumer(nats_server) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, BusSettings())
    client = JobClient(nc, js)
    await client.start()
    try:
        stream = await client.submit(make_job("job-live"))
        assert is_steps_subject(stream.job.reply_to)  # the Job names this replica
        log = EventLog(events_subject("job-live"))
        for seq in range(4):
            await store(js, stream, log, delta("job-live", seq, seq == 3))
        assert await collect(stream, 10) == [0, 1, 2, 3]
        assert stream.live  # never needed the log
        info = await js.stream_info(EVENTS_STREAM)
        assert info.state.consumer_count == 0
        stream.close()
    finally:
        await client.drain()
        await nc.close()


async def test_a_lost_delta_is_caught_up_from_the_log(nats_server) -> None:
    """A gap (seq skips one) and silence (the last Deltas never came) both recover."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, BusSettings())
    client = JobClient(nc, js)
    await client.start()
    try:
        gap = await client.submit(make_job("job-gap"))
        quiet = await client.submit(make_job("job-quiet"))
        streams = {"job-gap": gap, "job-quiet": quiet}
        logs = {j: EventLog(events_subject(j)) for j in streams}
        for j, s in streams.items():
            await store(js, s, logs[j], delta(j, 0))
        await asyncio.sleep(0.3)
        # Core delivery is at most once: seq 1 of both is stored but never sent live.
        for j, s in streams.items():
            await store(js, s, logs[j], delta(j, 1), deliver=False)
        await store(js, gap, logs["job-gap"], delta("job-gap", 2))
        await store(js, gap, logs["job-gap"], delta("job-gap", 3, True))
        await store(js, quiet, logs["job-quiet"], delta("job-quiet", 2, True), deliver=False)
        started = time.monotonic()
        assert await collect(gap, 10) == [0, 1, 2, 3]
        assert await collect(quiet, 10) == [0, 1, 2]
        assert not gap.live and not quiet.live
        # The silent one is noticed by the sweep, within its idle window and one sweep.
        assert time.monotonic() - started < CATCH_UP_IDLE_S + 3
        gap.close()
        quiet.close()
    finally:
        await client.drain()
        await nc.close()
