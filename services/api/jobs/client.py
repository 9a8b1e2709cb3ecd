"""Submit a Job to JetStream and stream its Deltas back; cancel it when nobody listens.

The API subscribes to the job's events subject with an ordered JetStream consumer
(deliver all) before publishing the job, so no delta can be missed, and a reconnecting
client is resumed from the deltas persisted in LLM_EVENTS (`attach`, on any replica).
The job itself is published with `Nats-Msg-Id` = job id: a retried submit inside the
duplicate window is dropped by the server instead of running twice.

A client that goes away cancels its job, after `reattach_grace_s` if set: a re-attach
to the job within the grace, through any replica, announces itself on `llm.attach.<id>`
and every replica drops its pending cancel for that job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from shared.messages import Delta, Job, MessageError, decode_delta, encode_job
from shared.subjects import (
    ATTACH_WILDCARD,
    EVENTS_STREAM,
    JOBS_STREAM,
    attach_subject,
    cancel_subject,
    events_subject,
    job_id_from_subject,
    jobs_subject,
)

log = structlog.get_logger("jetserve.api.jobs")

# Ordered consumers notice a consumer lost with a restarted nats-server after two missed
# heartbeats and recreate it from the last sequence seen; 1 s keeps that gap short.
EVENTS_IDLE_HEARTBEAT_S = 1.0


class JobFailed(RuntimeError):
    """The worker reported an error for the job, or the event stream broke."""


@dataclass
class JobClient:
    """Owns background cleanup tasks so cancellation of a request never drops them."""

    nc: NATS
    js: JetStreamContext
    reattach_grace_s: float = 0.0
    _background: set[asyncio.Task] = field(default_factory=set)
    _pending_cancels: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    _attach_sub: Any = None

    async def start(self) -> None:
        """Listen for re-attaches elsewhere so a pending cancel here is dropped."""
        self._attach_sub = await self.nc.subscribe(ATTACH_WILDCARD, cb=self._on_attach)

    async def _on_attach(self, msg: Msg) -> None:
        handle = self._pending_cancels.pop(job_id_from_subject(msg.subject), None)
        if handle is not None:
            handle.cancel()

    async def _subscribe(self, job_id: str) -> tuple[Any, asyncio.Queue[Msg]]:
        inbox: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            inbox.put_nowait(msg)

        sub = await self.js.subscribe(
            events_subject(job_id),
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            idle_heartbeat=EVENTS_IDLE_HEARTBEAT_S,
            cb=on_msg,
        )
        return sub, inbox

    async def publish_job(self, job: Job) -> int:
        """Queue the job; its sequence in LLM_JOBS (what a cancel of a queued job deletes)."""
        ack = await self.js.publish(
            jobs_subject(job.model),
            encode_job(job),
            stream=JOBS_STREAM,
            headers={"Nats-Msg-Id": job.id},
        )
        return int(ack.seq)

    async def submit(self, job: Job) -> JobStream:
        sub, inbox = await self._subscribe(job.id)
        try:
            await self.publish_job(job)
        except BaseException:
            self._spawn(sub.unsubscribe())
            raise
        return JobStream(client=self, job=job, sub=sub, inbox=inbox)

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
        sub, inbox = await self._subscribe(job.id)
        return JobStream(
            client=self,
            job=job,
            sub=sub,
            inbox=inbox,
            replay_through=replay_through,
            superseded_before=superseded_before,
            cancel_on_close=cancel_on_close,
        )

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
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background_nats_call_failed", error=str(task.exception()))

    async def drain(self) -> None:
        """Send what is owed: pending cancels fire now (nobody re-attaches to a stopped API)."""
        for job_id, handle in list(self._pending_cancels.items()):
            handle.cancel()
            self._spawn(self.nc.publish(cancel_subject(job_id), b""))
        self._pending_cancels.clear()
        if self._attach_sub is not None:
            self._spawn(self._attach_sub.unsubscribe())
            self._attach_sub = None
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


@dataclass
class JobStream:
    """The deltas of one submitted job, in order; `close()` cancels it if unfinished."""

    client: JobClient
    job: Job
    sub: Any
    inbox: asyncio.Queue[Msg]
    finished: bool = False
    closed: bool = False
    cancel_sent: bool = False
    next_seq: int = 0
    replay_through: int = -1  # attach: Deltas up to this seq were already shown to the client
    superseded_before: int = 0  # attach: error Deltas before this seq were replayed past
    cancel_on_close: bool = True  # False for the jobs API: its jobs outlive any reader

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """Deltas in order, grouped: everything already received comes as one batch.

        When this process keeps up, a batch is one delta. When it falls behind, the
        backlog is handled (and sent to the client) in one go, so per-token overhead
        shrinks exactly when it matters.
        """
        while not self.finished:
            msgs = [await self.inbox.get()]
            while not self.inbox.empty():
                msgs.append(self.inbox.get_nowait())
            batch = []
            for msg in msgs:
                delta = self._accept(msg)
                if delta is not None:
                    batch.append(delta)
                    if delta.finished:
                        break
            if batch:
                yield batch

    def _accept(self, msg: Msg) -> Delta | None:
        try:
            delta = decode_delta(msg.data)
        except MessageError as e:
            log.error("malformed_delta", job_id=self.job.id, error=str(e))
            return None
        if delta.seq < self.next_seq or self.finished:  # a duplicate from a retried publish
            return None
        self.next_seq = delta.seq + 1
        if delta.error is not None and delta.seq < self.superseded_before:
            return None  # the job was dead-lettered, then replayed: it went on after this
        self.finished = delta.finished
        return delta

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
        if self.cancel_on_close and not self.finished and not self.cancel_sent:
            self.cancel_sent = True
            self.client.cancel(self.job.id, self.client.reattach_grace_s)
        self.client._spawn(self.sub.unsubscribe())
