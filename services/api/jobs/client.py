"""Submit a Job to JetStream and stream its Deltas back; cancel it when nobody listens.

A new job is followed live without a JetStream consumer or a subscription of its own:
its Job names this replica's step subject (`reply_to` = `llm.steps.<replica>`), where a
worker sends, after storing each engine step's Deltas, the ones for this replica's jobs
as one message (shared/bus/step_delivery.py); one subscription per replica hands them
to the job's stream. Core delivery is at most once, so the log is the fallback: a
Delta whose seq skips one, or a job silent for `CATCH_UP_IDLE_S` while the log holds
Deltas not yet seen, switches the request to an ordered consumer over the job's stored
Deltas (duplicates are dropped by seq). A reconnecting client is resumed from the
deltas persisted in LLM_EVENTS (`attach`, on any replica). The job itself is published
with `Nats-Msg-Id` = job id: a retried submit inside the duplicate window is dropped by
the server instead of running twice.

A client that goes away cancels its job, after `reattach_grace_s` if set: a re-attach
to the job within the grace, through any replica, announces itself on `llm.attach.<id>`
and every replica drops its pending cancel for that job. A replica that drains does not
fire its pending cancels: it hands them to the other replicas on `llm.handoff.<id>`, so a
stream cut by the drain can re-attach elsewhere within the grace and complete (with no
other replica left, the job runs to its end).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from services.api.routing.router import Router
from shared.background_tasks import BackgroundTasks
from shared.bus.job_events import last_delta
from shared.bus.subjects import (
    ATTACH_WILDCARD,
    EVENTS_STREAM,
    HANDOFF_WILDCARD,
    JOBS_STREAM,
    attach_subject,
    cancel_subject,
    events_subject,
    handoff_subject,
    job_id_from_subject,
    jobs_subject,
    steps_subject,
)
from shared.messages import (
    Delta,
    Job,
    MessageError,
    decode_delta,
    decode_step_deltas,
    encode_job,
)
from shared.periodic import Periodic
from shared.retry import RetryPolicy, retry

log = structlog.get_logger("jetserve.api.jobs")

# Ordered consumers notice a consumer lost with a restarted nats-server after two missed
# heartbeats and recreate it from the last sequence seen; 1 s keeps that gap short.
EVENTS_IDLE_HEARTBEAT_S = 1.0
# A job followed on its core subject and silent this long is checked against its log;
# the check runs every CATCH_UP_SWEEP_S for all such jobs at once.
CATCH_UP_IDLE_S = 2.0
CATCH_UP_SWEEP_S = 1.0
# A Delta the log holds and this stream has not seen may still be on its way (a worker
# sends a step's Deltas once the store is acknowledged): looked at again after this.
CATCH_UP_CONFIRM_S = 1.0
# A stream that must catch up has nothing else to read: retry until it works or closes.
CATCH_UP_RETRY = RetryPolicy(deadline_s=math.inf, base_delay_s=0.1, max_delay_s=2.0)


class JobFailed(RuntimeError):
    """The worker reported an error for the job, or the event stream broke."""


@dataclass
class JobClient:
    """Owns background cleanup tasks so cancellation of a request never drops them."""

    nc: NATS
    js: JetStreamContext
    reattach_grace_s: float = 0.0
    router: Router | None = None  # --routing prefix: a worker's own subject when it pays
    _background: BackgroundTasks = field(
        default_factory=lambda: BackgroundTasks(log, "background_nats_call_failed")
    )
    _pending_cancels: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    _following: dict[str, int] = field(default_factory=dict)  # job id -> open streams here
    _attach_sub: Any = None
    _live: dict[str, JobStream] = field(default_factory=dict)  # followed on core subjects
    _sweeper: Periodic | None = None
    _handoff_sub: Any = None
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _steps_sub: Any = None

    @property
    def steps_subject(self) -> str:
        """Where workers send this replica the stored Deltas of its live jobs."""
        return steps_subject(self.replica_id)

    async def start(self) -> None:
        """Listen for the Deltas of this replica's jobs, for re-attaches elsewhere (a
        pending cancel here is dropped) and for pending cancels handed over by a replica
        that drains."""
        self._steps_sub = await self.nc.subscribe(self.steps_subject, cb=self._on_step)
        self._attach_sub = await self.nc.subscribe(ATTACH_WILDCARD, cb=self._on_attach)
        self._sweeper = Periodic(
            "catch-up-sweep", self._sweep, CATCH_UP_SWEEP_S, first_now=False, log=log
        )
        self._sweeper.start()
        self._handoff_sub = await self.nc.subscribe(HANDOFF_WILDCARD, cb=self._on_handoff)
        await self.nc.flush()  # the server knows where this replica's Deltas go

    async def _on_step(self, msg: Msg) -> None:
        """One worker step's stored Deltas for jobs of this replica: to their streams."""
        try:
            deltas = decode_step_deltas(msg.data)
        except MessageError as e:  # its streams see a gap or silence and read the log
            log.error("malformed_step_deltas", error=str(e))
            return
        live = self._live
        for delta in deltas:
            stream = live.get(delta.job_id)
            if stream is not None:
                stream.push(delta, True)

    async def _on_attach(self, msg: Msg) -> None:
        handle = self._pending_cancels.pop(job_id_from_subject(msg.subject), None)
        if handle is not None:
            handle.cancel()

    async def _on_handoff(self, msg: Msg) -> None:
        job_id = job_id_from_subject(msg.subject)
        if self._following.get(job_id) or self.reattach_grace_s <= 0:
            return  # its client is back here already, or this replica keeps no graces
        try:
            grace = min(float(msg.data or b"0"), self.reattach_grace_s)
        except ValueError:
            log.warning("malformed_handoff", job_id=job_id)
            return
        self.cancel(job_id, max(grace, 0.001))

    def _follow(self, job_id: str, delta: int) -> None:
        left = self._following.get(job_id, 0) + delta
        if left > 0:
            self._following[job_id] = left
        else:
            self._following.pop(job_id, None)

    async def _subscribe(self, stream: JobStream) -> Any:
        """An ordered consumer over the job's stored Deltas, from the first."""

        async def on_msg(msg: Msg) -> None:
            try:
                delta = decode_delta(msg.data)
            except MessageError as e:
                log.error("malformed_delta", job_id=stream.job.id, error=str(e))
                return
            stream.push(delta, False)

        return await self.js.subscribe(
            events_subject(stream.job.id),
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            idle_heartbeat=EVENTS_IDLE_HEARTBEAT_S,
            cb=on_msg,
        )

    async def publish_job(self, job: Job) -> int:
        """Queue the job; its sequence in LLM_JOBS (what a cancel of a queued job deletes).

        With a router, the job may go to one worker's subject (docs/routing.md); any
        worker moves it to the shared queue if that one does not pull it in time."""
        subject = jobs_subject(job.model)
        if self.router is not None:
            subject = self.router.route(job.model, job.prompt_token_ids, job.id).subject
        ack = await self.js.publish(
            subject,
            encode_job(job),
            stream=JOBS_STREAM,
            headers={"Nats-Msg-Id": job.id},
        )
        return int(ack.seq)

    async def submit(self, job: Job) -> JobStream:
        """Publish the job, its Deltas to come to this replica (followed before it runs)."""
        job = dataclasses.replace(job, reply_to=self.steps_subject)
        stream = JobStream(client=self, job=job, sub=None, live=True)
        self._live[job.id] = stream
        try:
            await self.publish_job(job)
        except BaseException:
            self._live.pop(job.id, None)
            raise
        self._follow(job.id, 1)
        return stream

    def catch_up(self, stream: JobStream) -> None:
        """Switch a live stream to its stored Deltas (a gap, or silence with news)."""
        if stream.live and not stream.closed:
            stream.live = False
            self._live.pop(stream.job.id, None)
            self._spawn(self._switch_to_log(stream))

    async def _switch_to_log(self, stream: JobStream) -> None:
        """Until it works (NATS may be restarting): the stream has nothing else to read."""
        log.info("stream_catch_up", job_id=stream.job.id, next_seq=stream.next_seq)
        old = stream.sub

        def on_retry(_: int, e: Exception) -> None:
            log.warning("stream_catch_up_retry", job_id=stream.job.id, error=str(e))

        with contextlib.suppress(Exception):  # only raised once the stream closed
            stream.sub = await retry(
                lambda: self._subscribe(stream),
                CATCH_UP_RETRY,
                on_retry,
                give_up=lambda: stream.closed,
            )
        if stream.closed and stream.sub is not old and stream.sub is not None:
            self._spawn(stream.sub.unsubscribe())
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()

    async def _sweep(self) -> None:
        now = time.monotonic()
        quiet = [
            s
            for s in list(self._live.values())
            if not s.finished and not s.closed and now - s.last_arrival > CATCH_UP_IDLE_S
        ]
        for s in [s for s in list(self._live.values()) if s.finished or s.closed]:
            self._live.pop(s.job.id, None)
        if quiet:
            await asyncio.gather(*(self._check_quiet(s) for s in quiet), return_exceptions=True)

    async def _check_quiet(self, stream: JobStream) -> None:
        """The log holds a Delta this stream has not seen: core lost it, catch up."""
        stored = await last_delta(self.js, stream.job.id)
        if stored is not None and stored.seq >= stream.next_seq:
            await asyncio.sleep(CATCH_UP_CONFIRM_S)
        if stored is not None and stored.seq >= stream.next_seq:
            self.catch_up(stream)
        else:
            stream.last_arrival = time.monotonic()

    async def attach(
        self, job: Job, replay_through: int, superseded_before: int, cancel_on_close: bool
    ) -> JobStream:
        """Follow a job that is already queued, running or done, from its first Delta.

        Deltas up to `replay_through` rebuild the reader's state without being shown
        again; error Deltas before `superseded_before` were followed by a replay of the
        job and do not end the stream.
        """
        handle = self._pending_cancels.pop(job.id, None)
        if handle is not None:
            handle.cancel()
        self._spawn(self.nc.publish(attach_subject(job.id), b""))
        stream = JobStream(
            client=self,
            job=job,
            sub=None,
            replay_through=replay_through,
            superseded_before=superseded_before,
            cancel_on_close=cancel_on_close,
        )
        stream.sub = await self._subscribe(stream)
        self._follow(job.id, 1)
        return stream

    def cancel(self, job_id: str, grace_s: float = 0.0) -> None:
        """Fire-and-forget: safe to call from a cancelled task or a finally block."""
        if grace_s <= 0:
            self._spawn(self.nc.publish(cancel_subject(job_id), b""))
            return
        loop = asyncio.get_running_loop()
        previous = self._pending_cancels.pop(job_id, None)
        if previous is not None:
            previous.cancel()

        def fire() -> None:
            if self._pending_cancels.pop(job_id, None) is not None:
                self._spawn(self.nc.publish(cancel_subject(job_id), b""))

        self._pending_cancels[job_id] = loop.call_later(grace_s, fire)

    def _spawn(self, coro) -> None:
        self._background.spawn(coro)

    async def drain(self) -> None:
        """Send what is owed. Pending cancels (a re-attach grace is running) go to the
        other replicas, whose grace then runs for the client's re-attach there; without a
        grace they fire now."""
        for sub in (self._attach_sub, self._handoff_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()  # not our own handoffs back
        self._attach_sub = self._handoff_sub = None  # the steps: open streams still finish
        grace = str(self.reattach_grace_s).encode()
        for job_id, handle in list(self._pending_cancels.items()):
            handle.cancel()
            subject = handoff_subject(job_id) if self.reattach_grace_s > 0 else None
            self._spawn(self.nc.publish(subject or cancel_subject(job_id), grace))
        self._pending_cancels.clear()
        if self._sweeper is not None:
            await self._sweeper.stop()
            self._sweeper = None
        await self._background.wait()


@dataclass
class JobStream:
    """The deltas of one submitted job, in order; `close()` cancels it if unfinished."""

    client: JobClient
    job: Job
    sub: Any  # the ordered consumer over the log, once it reads the log (None: live)
    finished: bool = False
    closed: bool = False
    cancel_sent: bool = False
    next_seq: int = 0
    replay_through: int = -1  # attach: Deltas up to this seq were already shown to the client
    superseded_before: int = 0  # attach: error Deltas before this seq were replayed past
    cancel_on_close: bool = True  # False for the jobs API: its jobs outlive any reader
    live: bool = False  # followed on the replica's step subject (until a gap: the log)
    last_arrival: float = field(default_factory=time.monotonic)
    # Deltas received and not yet read, each with whether it came live (not from the log):
    # handed over on the NATS read loop, read by the request's task with no queue between.
    _pending: list[tuple[Delta, bool]] = field(default_factory=list)
    _waiter: asyncio.Future[None] | None = None

    def push(self, delta: Delta, live: bool) -> None:
        """A received Delta (on the NATS read loop); wakes the reader if it waits."""
        self.last_arrival = time.monotonic()
        self._pending.append((delta, live))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """Deltas in order, grouped: everything already received comes as one batch.

        When this process keeps up, a batch is one delta. When it falls behind, the
        backlog is handled (and sent to the client) in one go, so per-token overhead
        shrinks exactly when it matters.
        """
        while not self.finished:
            if not self._pending:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
            received, self._pending = self._pending, []
            batch = []
            for delta, live in received:
                if self._accept(delta, live):
                    batch.append(delta)
                    if delta.finished:
                        break
            if batch:
                yield batch

    def _accept(self, delta: Delta, live: bool) -> bool:
        if live and not self.live:
            return False  # switched to the log, which delivers this one again, in order
        if delta.seq < self.next_seq or self.finished:  # a duplicate from a retried publish
            return False
        if delta.seq > self.next_seq and self.live:
            self.client.catch_up(self)  # core lost one: the log has it
            return False
        self.next_seq = delta.seq + 1
        if delta.error is not None and delta.seq < self.superseded_before:
            return False  # the job was dead-lettered, then replayed: it went on after this
        self.finished = delta.finished
        return True

    def request_cancel(self) -> None:
        """Ask the worker to abort; its final (abort) delta still arrives on this stream."""
        if not self.finished and not self.cancel_sent:
            self.cancel_sent = True
            self.client.cancel(self.job.id)

    def close(self) -> None:
        """Stop listening; a job that has not finished is cancelled on its worker (after the
        re-attach grace, if one is set)."""
        if self.closed:
            return
        self.closed = True
        self.client._follow(self.job.id, -1)
        if self.client.router is not None:
            self.client.router.finished(self.job.id)
        if self.cancel_on_close and not self.finished and not self.cancel_sent:
            self.cancel_sent = True
            self.client.cancel(self.job.id, self.client.reattach_grace_s)
        self.client._live.pop(self.job.id, None)
        if self.sub is not None:
            self.client._spawn(self.sub.unsubscribe())
