"""The job log in LLM_EVENTS against a real nats-server: fenced appends, history folding.

The fence is what keeps a job's log single-writer when two workers both think they own
the job (a slow worker whose job was redelivered elsewhere): the stale one is refused
and learns it lost the job, while a retry of our own stored append is recognised.
"""

from __future__ import annotations

import nats
import pytest

from shared.bus.event_log import Appended, EventLog, append
from shared.bus.jetstream import ensure_streams
from shared.bus.job_events import JobHistory, fold, fold_all, read_history
from shared.bus.subjects import events_subject
from shared.messages import CompletionChunk, Delta, Usage, encode_delta
from shared.settings import BusSettings
from tests.support.nats_process import NatsServer


def delta(seq: int, tokens: dict[int, list[int]], **kw) -> Delta:
    reasons = kw.pop("reasons", {})
    chunks = [
        CompletionChunk(index=i, token_ids=t, finish_reason=reasons.get(i))
        for i, t in tokens.items()
    ]
    return Delta(job_id="j1", seq=seq, chunks=chunks, worker_id=kw.pop("worker", "w1"), **kw)


def test_fold_skips_duplicates_and_lets_a_replay_supersede_an_error() -> None:
    usage = Usage(3, 4, 0, 0.0, 0.0)
    history = fold_all(
        "j1",
        [
            delta(0, {0: [1], 1: [2]}),
            delta(1, {0: [3], 1: []}, reasons={0: "length"}),
            delta(1, {0: [99]}),  # a duplicate seq: ignored
            delta(2, {1: []}, reasons={1: "error"}, finished=True, error="dead-lettered: x"),
        ],
    )
    assert history.next_seq == 3 and history.num_deltas == 3
    assert history.token_ids == {0: [1, 3], 1: [2]}
    assert history.finish_reasons == {0: "length"}  # "error" is not an end of a completion
    assert history.finished and history.error and not history.terminal
    assert history.resume_token_ids(2) == [[1, 3], [2]]
    # Replayed: a later Delta continues and the error no longer describes the job.
    assert fold(history, delta(3, {1: [5]}, worker="w2"))
    assert not history.finished and history.error is None
    assert fold(history, delta(4, {1: [6]}, reasons={1: "length"}, finished=True, usage=usage))
    assert history.terminal and history.usage == usage
    assert history.worker_ids == ["w1", "w2"] and history.num_tokens == 5
    assert JobHistory("x").resume_token_ids(2) == [[], []]


@pytest.fixture
async def js(nats_server: NatsServer):
    nc = await nats.connect(nats_server.url)
    await ensure_streams(nc.jetstream(), BusSettings())
    yield nc.jetstream()
    await nc.close()


async def test_fenced_appends_keep_one_writer(js) -> None:
    subject = events_subject("j1")
    owner = EventLog(subject)
    for seq in range(3):
        assert await append(js, owner, encode_delta(delta(seq, {0: [seq]})), 2.0) is Appended.STORED
    history = await read_history(js, "j1")
    assert history.next_seq == 3 and history.last_stream_seq == owner.fence > 0
    # A takeover continues from the stored tail ...
    taker = EventLog(subject, fence=history.last_stream_seq)
    assert await append(js, taker, encode_delta(delta(3, {0: [7]}, worker="w2")), 2.0) is (
        Appended.STORED
    )
    # ... after which the old owner can no longer write into the job's log.
    stale = encode_delta(delta(3, {0: [3]}))
    assert await append(js, owner, stale, 2.0) is Appended.LOST
    # A retry of an append that did land (its ack was lost) counts as stored.
    next_data = encode_delta(delta(4, {0: [8]}, worker="w2"))
    fence_before = taker.fence
    assert await append(js, taker, next_data, 2.0) is Appended.STORED
    taker.fence = fence_before  # as if that ack never arrived
    assert await append(js, taker, next_data, 2.0) is Appended.STORED
    history = await read_history(js, "j1")
    assert history.token_ids == {0: [0, 1, 2, 7, 8]} and history.next_seq == 5
    assert history.last_stream_seq == taker.fence
    # A fresh job's log starts at fence 0; a second "fresh" writer is refused.
    a, b = EventLog(events_subject("j2")), EventLog(events_subject("j2"))
    assert await append(js, a, encode_delta(delta(0, {0: [1]})), 2.0) is Appended.STORED
    assert await append(js, b, encode_delta(delta(0, {0: [2]})), 2.0) is Appended.LOST
    assert (await read_history(js, "none")).num_deltas == 0
