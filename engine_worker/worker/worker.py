"""The engine worker process (`jetserve worker`): JetStream jobs in, Deltas out.

One asyncio loop talks to NATS; the engine runs in its own thread (engine_thread.py).
The worker pulls from the model's durable consumer only as many jobs as the engine can
start now, so the backlog waits in JetStream where any worker can take it and where its
size is the autoscaling signal. Running jobs are kept alive with in-progress acks, each
engine step publishes one Delta per job to LLM_EVENTS, and a job is acked only after its
final Delta is stored, so a crash before that means redelivery, never a lost request.

Durability (see docs/durability.md): before running a job the worker reads the job's
Deltas already in LLM_EVENTS, so a redelivered job (its worker crashed or was stopped)
or a replayed dead letter continues after the last stored token, with seq numbering
continuing too; every append to the job's log is fenced on the log's previous tail, so
a worker that lost a job to a takeover cannot write into it. A delivery beyond
`max_deliver` is moved to LLM_DEAD instead of being run; the janitor covers messages
the server stopped delivering.

Malformed jobs are logged and terminated (never redelivered); cancels arrive on a core
subject and either abort a running job or are remembered for a queued one. SIGTERM stops
pulling, lets running jobs finish for `drain_timeout_s`, and hands the rest back (nak)
for another worker to take over. An engine failure hands its jobs back the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import time
from dataclasses import dataclass
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.worker.cancel_memory import CancelMemory
from engine_worker.worker.engine_thread import AddRequest, EngineThread, StepResult, admit_slots
from engine_worker.worker.janitor import Janitor, dead_reason
from engine_worker.worker.job_state import (
    JobState,
    delta_from_output,
    error_delta,
    final_delta,
    sampling_params,
    state_from_history,
)
from engine_worker.worker.model_facts import ModelFacts, model_facts
from engine_worker.worker.status_server import StatusServer
from shared.dead_letters import publish_dead_letter
from shared.event_log import Appended, append
from shared.jetstream import ensure_jobs_consumer, ensure_streams, models_object_store
from shared.jetstream import workers_bucket as open_workers_bucket
from shared.job_events import read_history
from shared.logging import configure_logging, get_logger
from shared.messages import Delta, MessageError, decode_job, encode_delta
from shared.metrics import new_registry, worker_metrics
from shared.settings import WorkerSettings, add_worker_arguments
from shared.subjects import (
    CANCEL_WILDCARD,
    JOBS_STREAM,
    consumer_name,
    events_subject,
    job_id_from_subject,
    jobs_subject,
    model_object_name,
    sanitize_model,
)
from shared.tokenizer import load_tokenizer
from shared.worker_registry import WorkerStatus, delete_status, put_status

FETCH_WAIT_S = 0.5  # long-poll for the first job; bounds how fast a stop is noticed
FETCH_MORE_WAIT_S = 0.05  # after one job arrived, how long to wait for more
PUBLISH_ATTEMPTS = 3
PUBLISH_RETRY_S = 30.0  # a Delta is retried this long (NATS restarting) before the job is dropped
HISTORY_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 30.0


@dataclass
class Outgoing:
    """A Delta to store, and what to do with the job's message once it is stored."""

    state: JobState
    delta: Delta
    action: str | None = None  # None (more to come), "ack" or "term"


def engine_config(settings: WorkerSettings) -> EngineConfig:
    return EngineConfig(
        model=settings.model,
        dtype=settings.dtype,
        device=settings.device,
        kv_cache_memory=settings.kv_cache_memory,
        num_kv_blocks=settings.num_kv_blocks,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len,
        attention_backend=settings.attention_backend,
    )


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        settings.validate()
        self.settings = settings
        self.model_name = settings.served_name
        self.worker_id = settings.worker_id
        self.log = get_logger("engine_worker").bind(worker_id=self.worker_id, model=self.model_name)
        self.registry = new_registry()
        self.metrics = worker_metrics(self.registry)
        self.jobs: dict[str, JobState] = {}
        self.cancelled = CancelMemory(ttl_s=settings.cancel_memory_s)
        self.engine: LLMEngine | None = None
        self.facts: ModelFacts | None = None
        self.engine_thread: EngineThread | None = None
        self.snapshot: StepResult | None = None
        self.nc: NATS | None = None
        self.exit_code = 0
        self.started_at = time.time()
        self.status_server = StatusServer(
            self.registry, self.health, settings.metrics_host, settings.metrics_port
        )
        self._adds_submitted = 0
        self._fatal: str | None = None
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._capacity_changed = asyncio.Event()
        self._no_jobs = asyncio.Event()  # set whenever self.jobs is empty (drain waits on it)
        self._no_jobs.set()
        self._publish_queue: asyncio.Queue[list[Outgoing] | None] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task] = {}
        self._kv: Any = None
        self._sub: Any = None
        self.janitor: Janitor | None = None
        self._admissions = 0

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        await self.status_server.start()
        self.log.info("worker_loading", model_dir=self.settings.model)
        engine = await asyncio.to_thread(LLMEngine, engine_config(self.settings))
        tokenizer_files: dict[str, bytes] = {}
        try:
            tokenizer = load_tokenizer(self.settings.model)
            engine.eos_token_ids |= tokenizer.eos_token_ids  # as the offline LLM does
            tokenizer_files = tokenizer.files()
        except ValueError as e:
            self.log.warning("no_tokenizer", error=str(e))
        self.engine = engine
        self.facts = await asyncio.to_thread(model_facts, engine)
        self.snapshot = StepResult([], engine.stats(), admit_slots(engine), 0)

        self.nc = await self._connect()
        js = self.nc.jetstream()
        await ensure_streams(js, self.settings)
        await ensure_jobs_consumer(js, self.model_name, self.settings)
        self._sub = await js.pull_subscribe_bind(
            durable=consumer_name(self.model_name), stream=JOBS_STREAM
        )
        self._kv = await open_workers_bucket(js, self.settings)
        obs = await models_object_store(js, self.settings)
        for name, data in tokenizer_files.items():
            await obs.put(model_object_name(self.model_name, name), data)
        await self.nc.subscribe(CANCEL_WILDCARD, cb=self._on_cancel)
        self.janitor = Janitor(
            nc=self.nc,
            js=js,
            model=self.model_name,
            worker_id=self.worker_id,
            sweep_interval_s=max(self.settings.ack_wait_s, 5.0),
            retry_for_s=PUBLISH_RETRY_S,
            log=self.log,
            on_dead=self._count_dead,
        )
        await self.janitor.start()

        loop = asyncio.get_running_loop()
        self.engine_thread = EngineThread(engine, loop, self._on_step)
        self.engine_thread.start()
        self._update_gauges()
        await self._heartbeat_once()
        for name, coro in (
            ("publisher", self._publisher()),
            ("heartbeat", self._heartbeat()),
            ("keepalive", self._keepalive()),
            ("puller", self._pull_loop()),
            ("janitor", self.janitor.sweep_forever()),
        ):
            self._tasks[name] = asyncio.create_task(coro, name=name)
        self.log.info(
            "worker_ready",
            subject=jobs_subject(self.model_name),
            metrics_port=self.status_server.port,
            max_model_len=engine.max_model_len,
            num_kv_blocks=engine.stats().num_total_blocks,
            max_num_seqs=self.settings.max_num_seqs,
        )

    async def _connect(self) -> NATS:
        """Retry the first connect so a worker may start before its nats-server."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                return await nats.connect(
                    self.settings.nats_url,
                    name=f"jetserve-worker-{self.worker_id}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self._on_nats_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
            except Exception as e:
                if time.monotonic() > deadline:
                    raise
                self.log.warning("nats_connect_retry", url=self.settings.nats_url, error=str(e))
                await asyncio.sleep(0.5)

    async def _on_nats_error(self, e: Exception) -> None:
        self.log.warning("nats_error", error=str(e))

    async def _on_disconnected(self) -> None:
        self.log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        self.log.info("nats_reconnected")

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            self.log.info("worker_stopping", running_jobs=len(self.jobs))
            self._stopping.set()

    async def run(self) -> int:
        """Start, serve until a stop is requested, shut down; the process exit code."""
        try:
            await self.start()
        except Exception as e:
            self.log.error("worker_start_failed", error=f"{type(e).__name__}: {e}")
            self.exit_code = 1
        else:
            await self._stopping.wait()
        finally:
            await self.shutdown()
        return self.exit_code

    async def shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._stopping.set()
        puller = self._tasks.pop("puller", None)
        if puller is not None:
            await asyncio.wait([puller], timeout=FETCH_WAIT_S + 2)
            puller.cancel()
        if self.janitor is not None:
            await self.janitor.stop()
        if self.jobs and self._fatal is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_jobs.wait(), self.settings.drain_timeout_s)
        # Hand unfinished jobs back: forget them first so their abort output is not published.
        # Their Deltas still queued are stored first, so whoever takes over continues after.
        handed_back = list(self.jobs.values())
        self.jobs.clear()
        if self.engine_thread is not None:
            for state in handed_back:
                self.engine_thread.abort(state.request_id)
            self.engine_thread.stop()
            await asyncio.to_thread(self.engine_thread.join, 30)
        self._publish_queue.put_nowait(None)
        publisher = self._tasks.pop("publisher", None)
        if publisher is not None:
            await asyncio.wait([publisher], timeout=10)
        for state in handed_back:
            if not state.lost:
                with contextlib.suppress(Exception):
                    await state.msg.nak()
        if handed_back:
            self.log.info("jobs_handed_back", job_ids=[s.id for s in handed_back])
        for task in self._tasks.values():
            task.cancel()
        # Bounded: on Python 3.11 a cancel that lands as a NATS reply arrives can be
        # swallowed inside asyncio.wait_for; the loops also check _stopped to end anyway.
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=5)
        self._tasks.clear()
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await delete_status(self._kv, self.model_name, self.worker_id)
        if self.nc is not None and not self.nc.is_closed:
            # flush + close rather than drain: draining a pull subscription waits out
            # its last lingering fetch; everything we owe the server is already sent.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.flush(), 5)
            await self.nc.close()
        await self.status_server.stop()
        self.log.info("worker_stopped", exit_code=self.exit_code)

    def health(self) -> tuple[bool, dict[str, Any]]:
        connected = self.nc is not None and self.nc.is_connected
        ready = self.engine_thread is not None and self.engine_thread.alive
        ok = connected and ready and self._fatal is None and not self._stopping.is_set()
        status = "ok" if ok else ("loading" if self.engine is None else "unavailable")
        return ok, {
            "status": status,
            "worker_id": self.worker_id,
            "model": self.model_name,
            "nats_connected": connected,
            "running_jobs": len(self.jobs),
        }

    # -- pulling jobs -------------------------------------------------------------------
    def capacity(self) -> int:
        """Jobs to pull now: what the engine can start minus adds it has not seen yet."""
        snap = self.snapshot
        if snap is None or self._fatal is not None or self._stopping.is_set():
            return 0
        in_flight = self._adds_submitted - snap.adds_applied
        return snap.admit_slots - in_flight

    async def _pull_loop(self) -> None:
        while not self._stopping.is_set():
            if self.capacity() <= 0:
                self._capacity_changed.clear()
                if self.capacity() <= 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._capacity_changed.wait(), FETCH_WAIT_S)
                continue
            # One lingering pull returns as soon as a job arrives; then a short one for
            # whatever else is already queued, up to the remaining capacity.
            for batch, wait in ((1, FETCH_WAIT_S), (None, FETCH_MORE_WAIT_S)):
                n = batch or self.capacity()
                if n <= 0 or self._stopping.is_set():
                    break
                try:
                    msgs = await self._sub.fetch(n, timeout=wait)
                except TimeoutError:
                    break
                except Exception as e:  # disconnected, server restarting: retry shortly
                    self.log.warning("fetch_failed", error=f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0.5)
                    break
                # Histories are read concurrently (one round trip each for a fresh job);
                # jobs then start in the order they were delivered.
                states = await asyncio.gather(*(self._prepare(msg) for msg in msgs))
                for state in states:
                    if state is not None:
                        self._start(state)

    async def _prepare(self, msg: Msg) -> JobState | None:
        """Decode a delivery and restore the job's state from LLM_EVENTS; None if handled."""
        try:
            job = decode_job(msg.data)
        except MessageError as e:
            await self._reject_malformed(msg, str(e))
            return None
        with structlog.contextvars.bound_contextvars(job_id=job.id):
            if sanitize_model(job.model) != sanitize_model(self.model_name):
                state = JobState(job, msg)
                error = f"job for model {job.model!r} reached a worker of {self.model_name!r}"
                self._reject(state, "wrong_model", error)
                return None
            existing = self.jobs.get(job.id)
            if existing is not None:
                # Our in-progress acks were late and the server redelivered to us: keep
                # running, answer for the newest delivery.
                existing.msg = msg
                self.log.warning("job_redelivered_while_running")
                return None
            assert self.nc is not None
            try:
                history = await read_history(self.nc.jetstream(), job.id, HISTORY_TIMEOUT_S)
            except Exception as e:
                # Not acked: JetStream redelivers it after ack_wait, when NATS answers again.
                self.log.warning("job_history_unreadable", error=f"{type(e).__name__}: {e}")
                return None
            delivered = _num_delivered(msg)
            if history.terminal:
                # The last worker stored the final Delta but died before its ack.
                self.log.info("job_already_finished", num_delivered=delivered)
                with contextlib.suppress(Exception):
                    await msg.ack()
                return None
            state = state_from_history(job, msg, history)
            if history.num_deltas:
                self.metrics.jobs_resumed.labels(model_name=self.model_name).inc()
                self.log.info(
                    "job_resumed",
                    num_delivered=delivered,
                    next_seq=state.next_seq,
                    produced_tokens=history.num_tokens,
                    previous_workers=history.worker_ids,
                )
            if delivered > self.settings.max_deliver:
                await self._dead_letter(state, delivered)
                return None
            return state

    def _start(self, state: JobState) -> None:
        job = state.job
        with structlog.contextvars.bound_contextvars(job_id=job.id):
            if job.id in self.jobs:
                return  # delivered twice in one batch; the first one runs
            if job.id in self.cancelled:
                self.log.info("job_skipped", reason="cancelled before start")
                self._enqueue([Outgoing(state, final_delta(state, "abort", self.worker_id), "ack")])
                return
            if job.deadline is not None and job.deadline < time.time():
                self.log.info("job_skipped", reason="deadline passed before start")
                delta = final_delta(state, "abort", self.worker_id, error="deadline exceeded")
                self._enqueue([Outgoing(state, delta, "ack")])
                return
            self._admissions += 1
            # A fresh engine request id per admission: a late output of an earlier
            # admission of the same job (aborted, then taken back) is never mistaken.
            state.request_id = f"{job.id}@{self._admissions}"
            self.jobs[job.id] = state
            self._no_jobs.clear()
            self._adds_submitted += 1
            assert self.engine_thread is not None
            self.engine_thread.add(
                AddRequest(
                    state.request_id,
                    job.prompt_token_ids,
                    sampling_params(job),
                    job.priority,
                    resume_token_ids=state.resume_token_ids,
                )
            )
            self.log.debug("job_admitted", prompt_tokens=len(job.prompt_token_ids))

    async def _dead_letter(self, state: JobState, delivered: int) -> None:
        """This delivery is one more than allowed: store the job in LLM_DEAD, close it."""
        reason = dead_reason(delivered - 1)
        assert self.nc is not None
        try:
            jobs_seq = int(state.msg.metadata.sequence.stream)
            await publish_dead_letter(
                self.nc.jetstream(),
                state.msg.data,
                state.id,
                self.model_name,
                reason,
                delivered - 1,
                self.worker_id,
                jobs_seq,
            )
        except Exception as e:
            # Left unacked: the server stops delivering it and the janitor moves it.
            self.log.warning("dead_letter_failed", job_id=state.id, error=str(e))
            return
        self.log.warning("job_dead_lettered", job_id=state.id, deliveries=delivered - 1)
        self._count_dead("delivery")
        delta = final_delta(state, "error", self.worker_id, error=f"dead-lettered: {reason}")
        self._enqueue([Outgoing(state, delta, "term")])

    def _count_dead(self, source: str) -> None:
        self.metrics.jobs_dead_lettered.labels(model_name=self.model_name, source=source).inc()

    async def _reject_malformed(self, msg: Msg, error: str) -> None:
        """Terminate: redelivering bytes that cannot decode would only fail again."""
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        self.log.warning(
            "job_rejected",
            reason="malformed",
            error=error,
            msg_id=msg_id,
            subject=msg.subject,
            num_delivered=_num_delivered(msg),
        )
        self.metrics.jobs_rejected.labels(model_name=self.model_name, reason="malformed").inc()
        try:
            subject = events_subject(msg_id)
        except ValueError:
            subject = None  # no usable id: nobody to tell
        if subject is not None:
            delta = error_delta(msg_id, f"malformed job: {error}", self.worker_id)
            await self._publish(subject, encode_delta(delta))
        with contextlib.suppress(Exception):
            await msg.term()

    def _reject(self, state: JobState, reason: str, error: str) -> None:
        self.log.warning("job_rejected", job_id=state.id, reason=reason, error=error)
        self.metrics.jobs_rejected.labels(model_name=self.model_name, reason=reason).inc()
        delta = final_delta(state, "error", self.worker_id, error=error)
        self._enqueue([Outgoing(state, delta, "term")])

    async def _on_cancel(self, msg: Msg) -> None:
        """Abort a job we run; remember any other id in case we pull that job later."""
        job_id = job_id_from_subject(msg.subject)
        state = self.jobs.get(job_id)
        if state is not None and not state.finished and self.engine_thread is not None:
            self.log.info("job_cancelled", job_id=job_id)
            self.engine_thread.abort(state.request_id)
        else:
            self.cancelled.add(job_id)

    # -- engine results (runs on the loop, called by the engine thread) ---------------
    def _on_step(self, result: StepResult) -> None:
        self.snapshot = result
        self._capacity_changed.set()
        self._update_gauges()
        if result.fatal is not None:
            self._fail_all(result.fatal)
            return
        batch: list[Outgoing] = []
        for request_id, error in result.rejected:
            state = self._state_of(request_id)
            if state is not None:
                self._reject(state, "invalid", error)
        share = result.step_time_s / max(len(result.outputs), 1)
        m = self.metrics
        for out in result.outputs:
            state = self._state_of(out.request_id)
            if state is None or state.finished:
                continue  # handed back during shutdown, lost, or closed already
            state.gpu_time_s += share
            if not state.prompt_counted:
                state.prompt_counted = True
                m.prompt_tokens.labels(model_name=self.model_name).inc(out.num_prompt_tokens)
            delta = delta_from_output(state, out, self.worker_id)
            new_tokens = sum(len(c.token_ids) for c in delta.chunks)
            if new_tokens:
                m.generation_tokens.labels(model_name=self.model_name).inc(new_tokens)
            action = None
            if delta.finished:
                action = "ack"
                reasons = [c.finish_reason for c in delta.chunks if c.finish_reason]
                m.request_success.labels(
                    model_name=self.model_name, finished_reason=reasons[0] if reasons else "stop"
                ).inc()
            batch.append(Outgoing(state, delta, action))
        self._enqueue(batch)

    def _state_of(self, request_id: str) -> JobState | None:
        """The job an engine request belongs to, if that admission is still current."""
        state = self.jobs.get(request_id.rpartition("@")[0])
        return state if state is not None and state.request_id == request_id else None

    def _fail_all(self, error: str) -> None:
        """The engine raised: stop this worker; shutdown hands its jobs back (nak).

        The jobs may be fine on a healthy worker, which continues them from their stored
        Deltas; a job that breaks every engine runs out of deliveries and is dead-lettered.
        """
        if self._fatal is not None:
            return
        self._fatal = error
        self.exit_code = 1
        self.log.error("engine_failed", error=error, running_jobs=len(self.jobs))
        self.request_stop()

    def _update_gauges(self) -> None:
        if self.snapshot is None:
            return
        s, m, name = self.snapshot.stats, self.metrics, self.model_name
        m.num_requests_running.labels(model_name=name).set(s.num_running)
        m.num_requests_waiting.labels(model_name=name).set(s.num_waiting)
        m.kv_cache_usage_perc.labels(model_name=name).set(s.kv_cache_usage)
        m.prefix_cache_hit_rate.labels(model_name=name).set(s.prefix_cache_hit_rate)
        m.num_free_blocks.labels(model_name=name).set(s.num_free_blocks)
        m.num_total_blocks.labels(model_name=name).set(s.num_total_blocks)
        m.num_preemptions.labels(model_name=name).set(s.num_preemptions)

    # -- publishing ------------------------------------------------------------------------
    def _enqueue(self, batch: list[Outgoing]) -> None:
        if batch:
            self._publish_queue.put_nowait(batch)

    async def _publish(self, subject: str, data: bytes) -> bool:
        """JetStream publish (stored, acknowledged), retried across a short NATS hiccup."""
        assert self.nc is not None
        js = self.nc.jetstream()
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await js.publish(subject, data)
                return True
            except Exception as e:
                self.log.warning(
                    "publish_failed", subject=subject, attempt=attempt + 1, error=str(e)
                )
                await asyncio.sleep(0.2 * (attempt + 1))
        return False

    async def _publisher(self) -> None:
        """Store each step's Deltas in order (a job's seq never overtakes), then ack."""
        while True:
            batch = await self._publish_queue.get()
            if batch is None:
                return
            try:
                await self._store_and_settle(batch)
            except Exception as e:  # a bug must not silently stop all publishing
                self.log.error("publisher_failed", error=f"{type(e).__name__}: {e}")

    async def _append(self, out: Outgoing) -> Appended:
        if out.state.lost:
            return Appended.LOST
        assert self.nc is not None and out.state.events is not None

        def on_retry(attempt: int, error: Exception) -> None:
            self.log.warning(
                "publish_retry", job_id=out.state.id, attempt=attempt, error=str(error)
            )

        return await append(
            self.nc.jetstream(),
            out.state.events,
            encode_delta(out.delta),
            PUBLISH_RETRY_S,
            on_retry,
        )

    async def _store_and_settle(self, batch: list[Outgoing]) -> None:
        """One gather per step: a job has at most one Delta in it, so seq order holds."""
        stored = await asyncio.gather(*(self._append(o) for o in batch))
        for out, result in zip(batch, stored, strict=True):
            if result is not Appended.STORED:
                self._drop(out.state, result)
                continue
            if out.action is None:
                continue
            self._forget(out.state)
            msg = out.state.msg
            try:
                if out.action == "ack":
                    await msg.ack()
                else:
                    await msg.term()
            except Exception as e:
                # The job's final Delta is stored: a redelivery will just ack it.
                self.log.warning("ack_failed", job_id=out.state.id, error=str(e))
            usage = out.delta.usage
            self.log.info(
                "job_finished",
                job_id=out.state.id,
                finish_reasons=[c.finish_reason for c in out.delta.chunks],
                completion_tokens=usage.completion_tokens if usage else 0,
                error=out.delta.error,
            )

    def _forget(self, state: JobState) -> None:
        if self.jobs.get(state.id) is state:
            del self.jobs[state.id]
        if not self.jobs:
            self._no_jobs.set()

    def _drop(self, state: JobState, result: Appended) -> None:
        """Stop a job whose Delta could not be stored, without acking it.

        LOST: another worker appended to its log (a takeover): it owns the job now.
        FAILED: NATS did not take the Delta in time; skipping it would leave a gap, so
        the job is left to redelivery, and whoever runs it next continues after the
        last Delta that was stored.
        """
        if state.lost:
            return
        state.lost = True
        state.finished = True
        self._forget(state)
        if self.engine_thread is not None and state.request_id:
            self.engine_thread.abort(state.request_id)
        if result is Appended.LOST:
            self.metrics.jobs_lost.labels(model_name=self.model_name).inc()
        self.log.warning("job_dropped", job_id=state.id, reason=result.value)

    # -- periodic work ---------------------------------------------------------------------
    async def _keepalive(self) -> None:
        """In-progress acks keep ack_wait from expiring on long jobs; deadlines abort."""
        interval = self.settings.ack_wait_s / 3
        while not self._stopped.is_set():
            await asyncio.sleep(interval)
            now = time.time()
            for state in list(self.jobs.values()):
                deadline = state.job.deadline
                if deadline is not None and now > deadline and self.engine_thread is not None:
                    self.engine_thread.abort(state.request_id)
                with contextlib.suppress(Exception):
                    await state.msg.in_progress()

    def status(self) -> WorkerStatus:
        assert self.engine is not None and self.snapshot is not None
        s = self.snapshot.stats
        return WorkerStatus(
            worker_id=self.worker_id,
            model=self.model_name,
            capacity=self.settings.max_num_seqs,
            max_model_len=self.engine.max_model_len,
            kv_cache_usage=s.kv_cache_usage,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            metrics_port=self.status_server.port,
            started_at=self.started_at,
            updated_at=time.time(),
            **(dataclasses.asdict(self.facts) if self.facts else {}),
        )

    async def _heartbeat_once(self) -> None:
        try:
            await put_status(self._kv, self.status())
        except Exception as e:
            self.log.warning("heartbeat_failed", error=str(e))

    async def _heartbeat(self) -> None:
        while not self._stopped.is_set():
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self._heartbeat_once()


def _num_delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:
        return 1


# -- `jetserve worker` ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser)


async def serve(settings: WorkerSettings) -> int:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    return await worker.run()


def run(args: argparse.Namespace) -> int:
    settings = WorkerSettings.from_args(args)
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        settings.validate()
    except ValueError as e:
        get_logger("engine_worker").error("bad_settings", error=str(e))
        return 2
    return asyncio.run(serve(settings))
