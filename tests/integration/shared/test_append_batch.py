"""One atomic batch per engine step keeps each job's log exactly as single appends would.

Real nats-server: every Delta lands on its own job's subject with its own fence; a job
taken over by another writer is refused alone while the others are stored.
"""

from __future__ import annotations

import nats
import pytest

from shared.bus.event_log import Appended, EventLog, append, append_batch
from shared.bus.jetstream import ensure_streams
from shared.bus.job_events import read_history
from shared.bus.subjects import EVENTS_STREAM, events_subject
from shared.messages import CompletionChunk, Delta, encode_delta
from shared.settings import BusSettings

pytestmark = pytest.mark.asyncio


def data(job: str, seq: int, worker: str = "w") -> bytes:
    chunk = CompletionChunk(index=0, token_ids=[seq + 5])
    return encode_delta(Delta(job_id=job, seq=seq, chunks=[chunk], worker_id=worker))


async def test_a_step_is_one_batch_and_every_log_keeps_its_fence(nats_server) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, BusSettings())
    jobs = [f"j{i}" for i in range(40)]
    logs = {j: EventLog(events_subject(j)) for j in jobs}
    try:
        for step in range(3):
            results = await append_batch(nc, js, [(logs[j], data(j, step)) for j in jobs], 5.0)
            assert results == [Appended.STORED] * len(jobs)
        for j in jobs:
            history = await read_history(js, j)
            assert history.next_seq == 3 and history.token_ids == {0: [5, 6, 7]}
            assert history.last_stream_seq == logs[j].fence
            last = await js.get_last_msg(EVENTS_STREAM, events_subject(j))
            assert int(last.seq) == logs[j].fence

        # Another worker took j3 over and appended: its fence moved, only j3 is refused.
        rival = EventLog(events_subject("j3"), fence=logs["j3"].fence)
        assert await append(js, rival, data("j3", 3, "rival"), 5.0) is Appended.STORED
        results = await append_batch(nc, js, [(logs[j], data(j, 3)) for j in jobs], 5.0)
        assert results == [Appended.LOST if j == "j3" else Appended.STORED for j in jobs]
        assert (await read_history(js, "j3")).num_deltas == 4  # no duplicate seq 3
        assert (await read_history(js, "j4")).token_ids == {0: [5, 6, 7, 8]}
    finally:
        await nc.close()


async def test_more_than_a_batch_holds_is_split(nats_server) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, BusSettings())
    logs = [EventLog(events_subject(f"k{i}")) for i in range(1203)]
    try:
        results = await append_batch(nc, js, [(log, b"x") for log in logs], 5.0)
        assert results == [Appended.STORED] * len(logs)
        info = await js.stream_info(EVENTS_STREAM)
        assert info.state.messages == len(logs)
        assert sorted(log.fence for log in logs) == list(range(1, len(logs) + 1))
    finally:
        await nc.close()
