"""The worker's intake in-process against a real nats-server: it pulls only what the engine
can start, closes malformed, wrong-model, cancelled and over-delivered jobs, and resumes a
job from its stored Deltas. The engine thread is real but never started, so admitted jobs
stay admitted and the test controls the engine's free slots through its StepResult."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nats
import pytest
import pytest_asyncio
import structlog
from nats.aio.client import Client as NATS

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.worker.cancel_memory import CancelMemory
from engine_worker.worker.engine_thread import EngineThread, StepResult
from engine_worker.worker.intake import Intake
from engine_worker.worker.job_state import JobState
from engine_worker.worker.outbox import Outbox, Outgoing
from engine_worker.worker.running import RunningJobs
from shared.bus.dead_letters import list_dead_letters
from shared.bus.jetstream import ensure_jobs_consumer, ensure_streams
from shared.bus.job_events import read_job_events
from shared.bus.subjects import (
    JOBS_STREAM,
    cancel_subject,
    consumer_name,
    events_subject,
    jobs_subject,
)
from shared.messages import CompletionChunk, Delta, Job, SamplingParams, encode_delta, encode_job
from shared.metrics import new_registry, worker_metrics
from shared.settings import BusSettings

MODEL = "intake-model"
MAX_DELIVER = 1  # the consumer allows one more delivery: the one that dead-letters


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama), max_num_seqs=8, num_kv_blocks=64))


@dataclass
class Parts:
    nc: NATS
    intake: Intake
    outbox: Outbox
    jobs: RunningJobs
    registry: object
    tasks: list[asyncio.Task]

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"model_name": MODEL, **labels}) or 0.0

    def run(self) -> None:
        self.tasks += [
            asyncio.create_task(self.intake.pull_loop()),
            asyncio.create_task(self.outbox.run()),
        ]

    def set_slots(self, admit_slots: int, adds_applied: int) -> None:
        """What the engine thread reports after a step: free slots, adds it has applied."""
        stats = self.intake.snapshot.stats
        self.intake.engine_stepped(StepResult([], stats, admit_slots, adds_applied))


@pytest_asyncio.fixture
async def parts(nats_server, engine: LLMEngine) -> AsyncIterator[Parts]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    settings = BusSettings(max_deliver=MAX_DELIVER)
    await ensure_streams(js, settings)
    await ensure_jobs_consumer(js, MODEL, settings)
    sub = await js.pull_subscribe_bind(durable=consumer_name(MODEL), stream=JOBS_STREAM)
    registry = new_registry()
    metrics = worker_metrics(registry)
    log = structlog.get_logger("test_intake")
    jobs = RunningJobs()
    thread = EngineThread(engine, asyncio.get_running_loop(), lambda result: None)
    outbox = Outbox(nc, js, jobs, thread.abort, metrics, MODEL, log, retry_for_s=2.0)
    intake = Intake(
        nc=nc,
        sub=sub,
        jobs=jobs,
        outbox=outbox,
        engine=thread,
        snapshot=StepResult([], engine.stats(), 8, 0),
        stopping=asyncio.Event(),
        model_name=MODEL,
        worker_id="w1",
        max_deliver=MAX_DELIVER,
        cancelled=CancelMemory(),
        metrics=metrics,
        log=log,
    )
    outbox.on_log_found = intake.restart_from_log  # as the worker wires them
    p = Parts(nc, intake, outbox, jobs, registry, [])
    yield p
    intake.stopping.set()
    outbox.close()
    await asyncio.wait_for(asyncio.gather(*p.tasks), 10)
    await nc.close()


def make_job(model: str = MODEL) -> Job:
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    return Job(job_id, model, [1, 2, 3], SamplingParams(max_tokens=4), time.time(), "")


async def submit(nc: NATS, job: Job) -> None:
    headers = {"Nats-Msg-Id": job.id}
    await nc.jetstream().publish(jobs_subject(MODEL), encode_job(job), headers=headers)


async def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def queue_counts(nc: NATS) -> tuple[int, int]:
    """(delivered but unacked, not yet delivered) on the model's consumer."""
    info = await nc.jetstream().consumer_info(JOBS_STREAM, consumer_name(MODEL))
    return info.num_ack_pending, info.num_pending


async def queue_counts_are(nc: NATS, want: tuple[int, int]) -> bool:
    return await queue_counts(nc) == want


async def test_pulls_only_as_many_jobs_as_the_engine_can_start(parts: Parts) -> None:
    parts.set_slots(admit_slots=2, adds_applied=0)
    for _ in range(5):
        await submit(parts.nc, make_job())
    parts.run()

    async def admitted(n: int) -> bool:
        return len(parts.jobs) == n

    await until(lambda: admitted(2))
    await asyncio.sleep(0.8)  # longer than a fetch: it pulls no more while the engine is full
    assert len(parts.jobs) == 2 and parts.intake.capacity() == 0
    assert await queue_counts(parts.nc) == (2, 3)  # the backlog waits in JetStream
    # The engine applied both adds and has room for three more.
    parts.set_slots(admit_slots=3, adds_applied=2)
    await until(lambda: admitted(5))
    assert await queue_counts(parts.nc) == (5, 0)
    assert len({s.request_id for s in parts.jobs.states()}) == 5


async def test_malformed_and_wrong_model_jobs_are_closed_with_an_error(parts: Parts) -> None:
    js = parts.nc.jetstream()
    await js.publish(jobs_subject(MODEL), b"\xc1 not msgpack", headers={"Nats-Msg-Id": "bad-1"})
    wrong_type = msgpack.unpackb(encode_job(make_job()))
    wrong_type["prompt_token_ids"] = "1 2 3"
    await js.publish(
        jobs_subject(MODEL), msgpack.packb(wrong_type), headers={"Nats-Msg-Id": "bad-2"}
    )
    other_model = make_job(model="another-model")
    await submit(parts.nc, other_model)
    parts.run()

    await until(lambda: queue_counts_are(parts.nc, (0, 0)))
    for job_id in ("bad-1", "bad-2"):
        (delta,), _ = await read_job_events(js, job_id)
        assert delta.finished and delta.error.startswith("malformed job")
    (delta,), _ = await read_job_events(js, other_model.id)
    assert delta.finished and "another-model" in delta.error
    assert delta.chunks[0].finish_reason == "error"
    assert parts.sample("jetserve:jobs_rejected_total", reason="malformed") == 2
    assert parts.sample("jetserve:jobs_rejected_total", reason="wrong_model") == 1
    assert len(parts.jobs) == 0
    info = await js.stream_info(JOBS_STREAM)
    assert info.state.messages == 0  # terminated, never to be redelivered


async def test_a_delivery_beyond_max_deliver_is_dead_lettered_not_run(parts: Parts) -> None:
    js = parts.nc.jetstream()
    job = make_job()
    await submit(parts.nc, job)
    # A first worker received it and handed it back (it stopped): that was its last run.
    other = await js.pull_subscribe_bind(durable=consumer_name(MODEL), stream=JOBS_STREAM)
    (msg,) = await other.fetch(1, timeout=5)
    await msg.nak()
    parts.run()

    async def dead() -> bool:
        return len(await list_dead_letters(js, timeout_s=2)) == 1

    await until(dead)
    (letter,) = await list_dead_letters(js)
    assert letter.job_id == job.id and letter.deliveries == MAX_DELIVER
    await until(lambda: queue_counts_are(parts.nc, (0, 0)))
    (delta,), _ = await read_job_events(js, job.id)
    assert delta.finished and delta.error.startswith("dead-lettered")
    assert parts.sample("jetserve:jobs_dead_lettered_total", source="delivery") == 1
    assert len(parts.jobs) == 0


async def test_a_job_cancelled_before_it_is_pulled_closes_without_running(parts: Parts) -> None:
    await parts.intake.subscribe_cancels()
    job = make_job()
    await parts.nc.publish(cancel_subject(job.id), b"")
    await parts.nc.flush()

    async def remembered() -> bool:
        return job.id in parts.intake.cancelled

    await until(remembered)
    await submit(parts.nc, job)
    parts.run()
    await until(lambda: queue_counts_are(parts.nc, (0, 0)))  # acked
    (delta,), _ = await read_job_events(parts.nc.jetstream(), job.id)
    assert delta.finished and delta.chunks[0].finish_reason == "abort"
    assert len(parts.jobs) == 0


async def run_until_admitted(parts: Parts, job: Job) -> JobState:
    """Submit `job`, start the intake and outbox, and return the job's state once admitted."""
    await submit(parts.nc, job)
    parts.run()

    async def admitted() -> bool:
        return job.id in parts.jobs

    await until(admitted)
    return parts.jobs.get(job.id)


def send_first_delta(parts: Parts, state: JobState) -> None:
    """What the worker's step would send for a new job: its Delta 0, one token."""
    delta = Delta(state.id, 0, [CompletionChunk(0, [5])], worker_id="w1")
    parts.outbox.enqueue([Outgoing(state, delta)])


async def test_a_job_whose_log_has_deltas_resumes_after_them(parts: Parts) -> None:
    """A first delivery whose log is not empty (a replayed dead letter looks like this)
    starts before its log is read; its first Delta is refused by the fence on an empty
    log, nothing of that start is stored, and the job runs again after the stored ones."""
    js = parts.nc.jetstream()
    job = make_job()
    for seq, tokens in enumerate(([7, 8], [9])):
        stored = Delta(job.id, seq, [CompletionChunk(0, tokens)], worker_id="w0")
        ack = await js.publish(events_subject(job.id), encode_delta(stored))
    first = await run_until_admitted(parts, job)
    assert first.optimistic and first.next_seq == 0 and first.events.fence == 0
    # what the worker's step would send: the job's first Delta, as if its log were empty
    send_first_delta(parts, first)

    async def restarted() -> bool:
        state = parts.jobs.get(job.id)
        return state is not None and state is not first

    await until(restarted)
    state = parts.jobs.get(job.id)
    assert first.lost and not state.optimistic
    assert state.next_seq == 2 and state.events.fence == ack.seq
    assert state.resume_token_ids == [[7, 8, 9]] and state.completion_tokens == 3
    assert parts.sample("jetserve:jobs_resumed_total") == 1
    assert parts.sample("jetserve:jobs_lost_total") == 0  # not a takeover
    deltas, _ = await read_job_events(js, job.id)
    assert [(d.seq, d.worker_id) for d in deltas] == [(0, "w0"), (1, "w0")]


async def test_a_first_delivery_with_an_empty_log_keeps_its_start(parts: Parts) -> None:
    job = make_job()
    state = await run_until_admitted(parts, job)
    assert state.optimistic
    send_first_delta(parts, state)

    async def stored() -> bool:
        return not state.optimistic

    await until(stored)
    assert parts.jobs.get(job.id) is state and not state.lost
    (delta,), _ = await read_job_events(parts.nc.jetstream(), job.id)
    assert delta.worker_id == "w1" and delta.chunks[0].token_ids == [5]
