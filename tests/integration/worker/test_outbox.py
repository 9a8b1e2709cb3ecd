"""The worker's outbox in-process against a real nats-server: Deltas stored in order in
LLM_EVENTS, the job's message settled only after its last one, a takeover drops the job."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import pytest_asyncio
import structlog
from nats.aio.client import Client as NATS

from engine_worker.worker.job_state import JobState, final_delta
from engine_worker.worker.outbox import MERGED_DELTA_BYTES, Outbox, Outgoing
from engine_worker.worker.running import RunningJobs
from shared.bus.jetstream import ensure_jobs_consumer, ensure_streams
from shared.bus.job_events import read_job_events
from shared.bus.subjects import JOBS_STREAM, consumer_name, events_subject, jobs_subject
from shared.messages import CompletionChunk, Delta, Job, SamplingParams, encode_delta, encode_job
from shared.metrics import new_registry, worker_metrics
from shared.settings import BusSettings

MODEL = "outbox-model"


@dataclass
class Aborts:
    """The engine side of a drop: which engine requests the outbox stopped."""

    request_ids: list[str] = field(default_factory=list)

    def __call__(self, request_id: str) -> None:
        self.request_ids.append(request_id)


@pytest_asyncio.fixture
async def nc(nats_server) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    settings = BusSettings()
    await ensure_streams(client.jetstream(), settings)
    await ensure_jobs_consumer(client.jetstream(), MODEL, settings)
    yield client
    await client.close()


async def delivered_job(nc: NATS) -> JobState:
    """A job published to LLM_JOBS and pulled like a worker does: its state with a live Msg."""
    js = nc.jetstream()
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    job = Job(job_id, MODEL, [1, 2, 3], SamplingParams(max_tokens=4), time.time(), "")
    await js.publish(jobs_subject(MODEL), encode_job(job), headers={"Nats-Msg-Id": job_id})
    sub = await js.pull_subscribe_bind(durable=consumer_name(MODEL), stream=JOBS_STREAM)
    (msg,) = await sub.fetch(1, timeout=5)
    return JobState(job, msg)


def token_delta(state: JobState, token: int) -> Delta:
    delta = Delta(state.id, state.next_seq, [CompletionChunk(0, [token])], worker_id="w1")
    state.next_seq += 1
    return delta


def make_outbox(nc: NATS, jobs: RunningJobs, aborts: Aborts, registry=None) -> Outbox:
    metrics = worker_metrics(registry or new_registry())
    log = structlog.get_logger("test_outbox")
    return Outbox(nc, nc.jetstream(), jobs, aborts, metrics, MODEL, log, retry_for_s=2.0)


async def two_running_jobs(
    nc: NATS,
) -> tuple[RunningJobs, Outbox, JobState, JobState, asyncio.Task]:
    """Two delivered jobs admitted to a running outbox's publisher."""
    jobs = RunningJobs()
    outbox = make_outbox(nc, jobs, Aborts())
    a, b = await delivered_job(nc), await delivered_job(nc)
    jobs.admit(a)
    jobs.admit(b)
    return jobs, outbox, a, b, asyncio.create_task(outbox.run())


async def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def consumer_counts(nc: NATS) -> tuple[int, int]:
    info = await nc.jetstream().consumer_info(JOBS_STREAM, consumer_name(MODEL))
    return info.num_ack_pending, info.num_pending


async def test_deltas_are_stored_in_order_and_the_job_acked_after_the_last(nc: NATS) -> None:
    jobs, aborts = RunningJobs(), Aborts()
    outbox = make_outbox(nc, jobs, aborts)
    state = await delivered_job(nc)
    jobs.admit(state)
    publisher = asyncio.create_task(outbox.run())
    for token in (7, 8):  # each stored before the next comes
        fence = state.events.fence
        outbox.enqueue([Outgoing(state, token_delta(state, token))])
        await until(lambda fence=fence: state.events.fence > fence)
    # Stored but not finished: the message is still held (unacked) by this worker.
    await asyncio.sleep(0.3)
    assert await consumer_counts(nc) == (1, 0) and len(jobs) == 1
    outbox.enqueue([Outgoing(state, final_delta(state, "length", "w1"), "ack")])
    outbox.close()
    await asyncio.wait_for(publisher, 10)

    deltas, last_seq = await read_job_events(nc.jetstream(), state.id)
    assert [d.seq for d in deltas] == [0, 1, 2]
    assert [c.token_ids for d in deltas for c in d.chunks] == [[7], [8], []]
    assert deltas[-1].finished and state.events.fence == last_seq
    assert await consumer_counts(nc) == (0, 0)  # acked: gone from the work queue
    assert len(jobs) == 0 and aborts.request_ids == []


async def test_deltas_that_wait_behind_a_store_merge_per_job(nc: NATS) -> None:
    """An engine faster than the store round trip: what a job makes meanwhile becomes one
    Delta of the next batch, its seqs still contiguous and its action kept."""
    jobs, outbox, a, b, publisher = await two_running_jobs(nc)
    outbox.enqueue([Outgoing(a, token_delta(a, 1)), Outgoing(b, token_delta(b, 1))])
    await asyncio.sleep(0)  # the publisher takes that batch: its store is now in flight
    for token in (2, 3, 4):
        outbox.enqueue([Outgoing(a, token_delta(a, token)), Outgoing(b, token_delta(b, token))])
    outbox.enqueue([Outgoing(a, final_delta(a, "length", "w1"), "ack")])
    assert (a.next_seq, b.next_seq) == (2, 2)  # the waiting Deltas gave their seqs back
    outbox.enqueue([Outgoing(b, token_delta(b, 5))])
    outbox.close()
    await asyncio.wait_for(publisher, 10)

    for state, want in ((a, [[1], [2, 3, 4]]), (b, [[1], [2, 3, 4, 5]])):
        deltas, _ = await read_job_events(nc.jetstream(), state.id)
        assert [d.seq for d in deltas] == [0, 1]
        assert [c.token_ids for d in deltas for c in d.chunks] == want
    a_last = (await read_job_events(nc.jetstream(), a.id))[0][-1]
    assert a_last.finished and a_last.chunks[0].finish_reason == "length"
    assert a not in jobs.states() and b in jobs.states()  # a acked once stored; b runs on


def logprob_delta(state: JobState, token: int, top: int) -> Delta:
    """One token with `top` alternatives: about 15 bytes each on the wire."""
    alts = [(t, -1.5) for t in range(top)]
    chunk = CompletionChunk(0, [token], logprobs=[(token, -0.5, alts)])
    delta = Delta(state.id, state.next_seq, [chunk], worker_id="w1")
    state.next_seq += 1
    return delta


async def test_a_merged_delta_stops_growing_at_its_size_cap(nc: NATS) -> None:
    """A store that lags long behind a job with logprobs: its waiting Deltas merge up to
    MERGED_DELTA_BYTES, then go on in the batches after, each stored message under NATS's
    max_payload, every token stored once and in order, seqs contiguous."""
    jobs, outbox, a, b, publisher = await two_running_jobs(nc)
    outbox.enqueue([Outgoing(a, token_delta(a, 0)), Outgoing(b, token_delta(b, 0))])
    await asyncio.sleep(0)  # that batch's store is in flight: everything below waits
    per_token = Outgoing(a, logprob_delta(a, 0, 100)).size
    a.next_seq -= 1
    tokens = 3 * MERGED_DELTA_BYTES // per_token  # three merged Deltas' worth
    for token in range(1, tokens + 1):
        outbox.enqueue(
            [Outgoing(a, logprob_delta(a, token, 100)), Outgoing(b, token_delta(b, token))]
        )
    assert len(outbox._waiting) >= 3  # a's later Deltas went to later batches
    outbox.enqueue([Outgoing(a, final_delta(a, "length", "w1"), "ack")])
    outbox.enqueue([Outgoing(b, final_delta(b, "length", "w1"), "ack")])
    outbox.close()
    await asyncio.wait_for(publisher, 30)

    sub = await nc.jetstream().subscribe(events_subject(a.id), ordered_consumer=True)
    sizes = []
    for _ in range(a.next_seq):
        sizes.append(len((await sub.next_msg(timeout=5)).data))
    await sub.unsubscribe()
    assert max(sizes) <= MERGED_DELTA_BYTES < 1024 * 1024
    for state in (a, b):
        deltas, _ = await read_job_events(nc.jetstream(), state.id)
        assert [d.seq for d in deltas] == list(range(len(deltas)))
        assert [t for d in deltas for c in d.chunks for t in c.token_ids] == list(range(tokens + 1))
        assert deltas[-1].finished and state not in jobs.states()
    a_deltas, _ = await read_job_events(nc.jetstream(), a.id)
    assert len(a_deltas) >= 5  # the first, at least three capped merges, the final
    assert [len(c.logprobs or []) for d in a_deltas[1:] for c in d.chunks] == [
        len(c.token_ids) for d in a_deltas[1:] for c in d.chunks
    ]
    assert len((await read_job_events(nc.jetstream(), b.id))[0]) == 2  # b merged freely


async def test_term_action_terminates_the_message(nc: NATS) -> None:
    jobs = RunningJobs()
    outbox = make_outbox(nc, jobs, Aborts())
    state = await delivered_job(nc)
    publisher = asyncio.create_task(outbox.run())
    delta = final_delta(state, "error", "w1", error="rejected")
    outbox.enqueue([Outgoing(state, delta, "term")])
    outbox.close()
    await asyncio.wait_for(publisher, 10)
    (stored,), _ = await read_job_events(nc.jetstream(), state.id)
    assert stored.error == "rejected" and stored.finished
    assert await consumer_counts(nc) == (0, 0)


async def test_a_takeover_drops_the_job_without_acking(nc: NATS) -> None:
    jobs, aborts, registry = RunningJobs(), Aborts(), new_registry()
    outbox = make_outbox(nc, jobs, aborts, registry)
    state = await delivered_job(nc)
    request_id = jobs.admit(state)
    publisher = asyncio.create_task(outbox.run())
    outbox.enqueue([Outgoing(state, token_delta(state, 7))])
    await until(lambda: state.events.fence > 0)
    # Another worker took the job over and appended its own Delta to the job's log.
    other = Delta(state.id, 1, [CompletionChunk(0, [99])], worker_id="w2")
    await nc.jetstream().publish(events_subject(state.id), encode_delta(other))
    outbox.enqueue([Outgoing(state, token_delta(state, 8))])
    outbox.enqueue([Outgoing(state, final_delta(state, "length", "w1"), "ack")])
    outbox.close()
    await asyncio.wait_for(publisher, 10)

    deltas, _ = await read_job_events(nc.jetstream(), state.id)
    assert [(d.seq, d.worker_id) for d in deltas] == [(0, "w1"), (1, "w2")]  # one writer each
    assert state.lost and len(jobs) == 0
    assert aborts.request_ids == [request_id]  # the engine stops running it
    lost = registry.get_sample_value("jetserve:jobs_lost_total", {"model_name": MODEL})
    assert lost == 1
    assert await consumer_counts(nc) == (1, 0)  # not acked: the new owner settles it
