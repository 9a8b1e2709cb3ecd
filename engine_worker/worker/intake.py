"""Jobs in: pull only what the engine can start, decode, validate, restore, admit.

The worker pulls from the model's durable consumer only as many jobs as the engine can
start now, so the backlog waits in JetStream where any worker can take it and where its
size is the autoscaling signal. A redelivered job's Deltas already in LLM_EVENTS are read
before it runs, so it (its worker crashed or was stopped) continues after the last stored
token; a first delivery starts without that read, its first Delta fenced on an empty log,
and one whose log had Deltas after all (a replayed dead letter) restarts from the log. A
delivery beyond `max_deliver` is moved to LLM_DEAD instead of being run. Malformed jobs
are logged and terminated (never redelivered). A job of a wire version newer than this
worker reads (a newer API during a rolling upgrade) is not malformed: it is handed back
with a delay for a worker that reads it (docs/upgrading.md). Cancels arrive on a core subject and either abort a running job
or are remembered for a queued one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from engine_worker.engine_core.handle import EngineHandle
from engine_worker.engine_core.messages import AddRequest, StepResult
from engine_worker.worker.cancel_memory import CancelMemory
from engine_worker.worker.janitor import dead_reason
from engine_worker.worker.job_state import (
    JobState,
    error_delta,
    final_delta,
    sampling_params,
    state_from_history,
)
from engine_worker.worker.outbox import Outbox, Outgoing
from engine_worker.worker.routing.fallback import (
    is_routed,
    is_stale,
    move_to_shared,
    prior_runs,
)
from engine_worker.worker.running import RunningJobs
from shared.bus.dead_letters import publish_dead_letter
from shared.bus.job_events import JobHistory, read_history
from shared.bus.subjects import CANCEL_WILDCARD, events_subject, job_id_from_subject, sanitize_model
from shared.messages import (
    JOB_READERS,
    JobReader,
    MessageError,
    NewerVersion,
    decode_job,
    encode_delta,
)
from shared.metrics import WorkerMetrics

FETCH_WAIT_S = 0.5  # long-poll for the first job; bounds how fast a stop is noticed
FETCH_MORE_WAIT_S = 0.05  # after one job arrived, how long to wait for more
HISTORY_TIMEOUT_S = 10.0


def num_delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:
        return 1


def runs_so_far(msg: Msg) -> int:
    """Deliveries of this job counting this one: the shared consumer's count plus the runs
    it had on a worker's routed subject before it was moved (routing/fallback.py)."""
    return num_delivered(msg) + prior_runs(msg)


def _message_key(msg: Msg) -> str:
    """The message's LLM_JOBS sequence (unique), else its Nats-Msg-Id."""
    try:
        return f"seq-{int(msg.metadata.sequence.stream)}"
    except Exception:
        return (msg.headers or {}).get("Nats-Msg-Id", "")


@dataclass
class Intake:
    nc: NATS
    sub: Any  # pull subscription bound to the model's durable consumer
    jobs: RunningJobs
    outbox: Outbox
    engine: EngineHandle  # a thread or a child process (engine_worker/engine_core/)
    snapshot: StepResult  # the engine's latest state: how many jobs it can start now
    stopping: asyncio.Event  # set: pull nothing more
    model_name: str
    worker_id: str
    max_deliver: int
    cancelled: CancelMemory
    metrics: WorkerMetrics
    log: Any
    job_readers: Mapping[int, JobReader] = field(default_factory=lambda: JOB_READERS)
    defer_s: float = 30.0  # a job too new for this worker is redelivered after 1-1.5x this
    # Pull subscription on this worker's routed subject (prefix routing, docs/routing.md);
    # pulled beside the shared queue and before it.
    routed_sub: Any = None
    ack_wait_s: float = 30.0
    _adds_submitted: int = 0
    _routed_backlog: bool = False
    # Messages already reported as too new (a bounded, expiring set): one log line each.
    _deferred: CancelMemory = field(default_factory=lambda: CancelMemory(ttl_s=3600.0))
    _capacity_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _cancel_sub: Any = None
    _restarts: set[asyncio.Task] = field(default_factory=set)

    async def subscribe_cancels(self) -> None:
        self._cancel_sub = await self.nc.subscribe(CANCEL_WILDCARD, cb=self.on_cancel)

    def engine_stepped(self, result: StepResult) -> None:
        self.snapshot = result
        self._capacity_changed.set()

    def capacity(self) -> int:
        """Jobs to pull now: what the engine can start minus adds it has not seen yet."""
        if self.stopping.is_set():
            return 0
        in_flight = self._adds_submitted - self.snapshot.adds_applied
        return self.snapshot.admit_slots - in_flight

    async def pull_loop(self) -> None:
        """Pull the shared queue and, when there is one, this worker's routed subject at
        once: each long-polls for one job, so a job on either starts without waiting out
        the other's poll (at the edge of capacity that may admit one job more than the
        engine can start now; it waits in the engine)."""
        if self.routed_sub is None:
            await self._pull(self.sub, "shared")
            return
        await asyncio.gather(self._pull(self.routed_sub, "routed"), self._pull(self.sub, "shared"))

    async def _pull(self, sub: Any, queue: str) -> None:
        while not self.stopping.is_set():
            if queue == "shared" and self._routed_backlog:
                # Routed jobs first: they are here because their prefix is cached here.
                self._capacity_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._capacity_changed.wait(), FETCH_MORE_WAIT_S)
                continue
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
                if n <= 0 or self.stopping.is_set():
                    break
                try:
                    msgs = await sub.fetch(n, timeout=wait)
                except TimeoutError:
                    if queue == "routed":
                        self._routed_backlog = False
                    break
                except Exception as e:  # disconnected, server restarting: retry shortly
                    self.log.warning("fetch_failed", error=f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0.5)
                    break
                if queue == "routed":
                    self._routed_backlog = len(msgs) >= n
                self.metrics.jobs_pulled.labels(model_name=self.model_name, queue=queue).inc(
                    len(msgs)
                )
                # Histories are read concurrently (one round trip each for a fresh job);
                # jobs then start in the order they were delivered.
                states = await asyncio.gather(*(self.prepare(msg) for msg in msgs))
                for state in states:
                    if state is not None:
                        self.admit(state)

    async def prepare(self, msg: Msg, read_log: bool = False) -> JobState | None:
        """Decode a delivery and restore the job's state from LLM_EVENTS; None if handled.

        A first delivery starts without reading its log (one round trip to NATS off every
        request's time to first token): its first Delta is fenced on an empty log, so if
        the log was not empty after all (a replayed dead letter, a job cancelled while it
        was queued), that append is refused and `restart_from_log` runs it again from the
        log, before anything it made has been stored or shown. `read_log`: read it anyway.
        """
        try:
            job = decode_job(msg.data, self.job_readers)
        except NewerVersion as e:
            await self._leave_for_newer(msg, e.version)
            return None
        except MessageError as e:
            await self.reject_malformed(msg, str(e))
            return None
        with structlog.contextvars.bound_contextvars(job_id=job.id):
            if is_routed(msg, self.model_name) and self.jobs.get(job.id) is None:
                # A routed job runs on its first delivery only; any later one goes to the
                # shared queue (routing/fallback.py explains why that makes it run once).
                if num_delivered(msg) > 1:
                    await self.move_routed(msg, num_delivered(msg) - 1, "redelivered")
                    return None
                if is_stale(msg, self.ack_wait_s):
                    await self.move_routed(msg, 0, "stale")
                    return None
            if sanitize_model(job.model) != sanitize_model(self.model_name):
                state = JobState(job, msg)
                error = f"job for model {job.model!r} reached a worker of {self.model_name!r}"
                self.reject(state, "wrong_model", error)
                return None
            existing = self.jobs.get(job.id)
            if existing is not None:
                # Our in-progress acks were late and the server redelivered to us: keep
                # running, answer for the newest delivery.
                existing.msg = msg
                self.log.warning("job_redelivered_while_running")
                return None
            delivered = runs_so_far(msg)
            if delivered == 1 and not read_log:
                state = state_from_history(job, msg, JobHistory(job.id))
                state.optimistic = True
                return state
            try:
                history = await read_history(self.nc.jetstream(), job.id, HISTORY_TIMEOUT_S)
            except Exception as e:
                # Not acked: JetStream redelivers it after ack_wait, when NATS answers again.
                self.log.warning("job_history_unreadable", error=f"{type(e).__name__}: {e}")
                return None
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
            if delivered > self.max_deliver:
                await self._dead_letter(state, delivered)
                return None
            return state

    def restart_from_log(self, state: JobState) -> None:
        """An optimistic job whose log had Deltas (the outbox dropped it): run it again from
        its log, as a redelivery would, without waiting out ack_wait."""

        async def restart() -> None:
            restored = await self.prepare(state.msg, read_log=True)
            if restored is not None:
                self.admit(restored)

        task = asyncio.get_running_loop().create_task(restart())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def move_routed(self, msg: Msg, runs: int, reason: str) -> bool:
        """Hand a routed delivery to the shared queue; False if NATS refused (left unacked,
        it is redelivered and moved again)."""
        try:
            await move_to_shared(self.nc.jetstream(), self.model_name, msg, runs)
        except Exception as e:
            self.log.warning("routed_move_failed", reason=reason, error=f"{type(e).__name__}: {e}")
            return False
        self.metrics.routed_fallbacks.labels(model_name=self.model_name, reason=reason).inc()
        self.log.info("routed_job_moved", reason=reason, runs=runs)
        return True

    def admit(self, state: JobState) -> None:
        """Hand a prepared job to the engine, or close it if it should not run."""
        job = state.job
        with structlog.contextvars.bound_contextvars(job_id=job.id):
            if job.id in self.jobs:
                return  # delivered twice in one batch; the first one runs
            if job.id in self.cancelled:
                self.log.info("job_skipped", reason="cancelled before start")
                delta = final_delta(state, "abort", self.worker_id)
                self.outbox.enqueue([Outgoing(state, delta, "ack")])
                return
            if job.deadline is not None and job.deadline < time.time():
                self.log.info("job_skipped", reason="deadline passed before start")
                delta = final_delta(state, "abort", self.worker_id, error="deadline exceeded")
                self.outbox.enqueue([Outgoing(state, delta, "ack")])
                return
            request_id = self.jobs.admit(state)
            self._adds_submitted += 1
            self.engine.add(
                AddRequest(
                    request_id,
                    job.prompt_token_ids,
                    sampling_params(job),
                    job.priority,
                    resume_token_ids=state.resume_token_ids,
                )
            )
            self.log.debug("job_admitted", prompt_tokens=len(job.prompt_token_ids))

    def reject(self, state: JobState, reason: str, error: str) -> None:
        """Close a decodable job that cannot run here (wrong model, invalid for the engine)."""
        self.log.warning("job_rejected", job_id=state.id, reason=reason, error=error)
        self.metrics.jobs_rejected.labels(model_name=self.model_name, reason=reason).inc()
        delta = final_delta(state, "error", self.worker_id, error=error)
        self.outbox.enqueue([Outgoing(state, delta, "term")])

    async def reject_malformed(self, msg: Msg, error: str) -> None:
        """Terminate: redelivering bytes that cannot decode would only fail again."""
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        self.log.warning(
            "job_rejected",
            reason="malformed",
            error=error,
            msg_id=msg_id,
            subject=msg.subject,
            num_delivered=num_delivered(msg),
        )
        self.metrics.jobs_rejected.labels(model_name=self.model_name, reason="malformed").inc()
        try:
            subject = events_subject(msg_id)
        except ValueError:
            subject = None  # no usable id: nobody to tell
        if subject is not None:
            delta = error_delta(msg_id, f"malformed job: {error}", self.worker_id)
            await self.outbox.publish(subject, encode_delta(delta))
        with contextlib.suppress(Exception):
            await msg.term()

    async def _leave_for_newer(self, msg: Msg, version: int) -> None:
        """Neither run nor drop a job written by a newer release: nak it with a delay, so a
        worker that reads its version takes it, and say so once per message."""
        key = _message_key(msg)
        if key not in self._deferred:
            self._deferred.add(key)
            self.log.warning(
                "job_left_for_newer_worker",
                msg_id=(msg.headers or {}).get("Nats-Msg-Id", ""),
                wire_version=version,
                reads_versions=sorted(self.job_readers),
                retry_in_about_s=self.defer_s,
                hint="a newer API is publishing: upgrade this worker (docs/upgrading.md)",
            )
        labels = {"model_name": self.model_name, "wire_version": str(version)}
        self.metrics.jobs_deferred.labels(**labels).inc()
        # Jittered: with a fixed delay the redelivery lands when this worker's own pull,
        # re-issued on a cycle that began at this nak, is the oldest waiting one, so the
        # server hands the job straight back here most of the time (seen: 13 bounces in a
        # row while a newer worker pulled too).
        delay = self.defer_s * random.uniform(1.0, 1.5)
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)

    async def _dead_letter(self, state: JobState, delivered: int) -> None:
        """This delivery is one more than allowed: store the job in LLM_DEAD, close it."""
        reason = dead_reason(delivered - 1)
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
        self.count_dead("delivery")
        delta = final_delta(state, "error", self.worker_id, error=f"dead-lettered: {reason}")
        self.outbox.enqueue([Outgoing(state, delta, "term")])

    def count_dead(self, source: str) -> None:
        self.metrics.jobs_dead_lettered.labels(model_name=self.model_name, source=source).inc()

    async def on_cancel(self, msg: Msg) -> None:
        """Abort a job we run; remember any other id in case we pull that job later."""
        job_id = job_id_from_subject(msg.subject)
        state = self.jobs.get(job_id)
        if state is not None and not state.finished:
            self.log.info("job_cancelled", job_id=job_id)
            self.engine.abort(state.request_id)
        else:
            self.cancelled.add(job_id)
