"""Submit a Job to JetStream and stream its Deltas back; cancel it when nobody listens.

The API subscribes to the job's events subject with an ordered JetStream consumer
(deliver all) before publishing the job, so no delta can be missed, and a reconnecting
client can later be resumed from the deltas persisted in LLM_EVENTS. The job itself is
published with `Nats-Msg-Id` = job id: a retried submit inside the duplicate window is
dropped by the server instead of running twice.
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
from shared.subjects import EVENTS_STREAM, JOBS_STREAM, cancel_subject, events_subject, jobs_subject

log = structlog.get_logger("jetserve.api.jobs")


class JobFailed(RuntimeError):
    """The worker reported an error for the job, or the event stream broke."""


@dataclass
class JobClient:
    """Owns background cleanup tasks so cancellation of a request never drops them."""

    nc: NATS
    js: JetStreamContext
    _background: set[asyncio.Task] = field(default_factory=set)

    async def submit(self, job: Job) -> JobStream:
        inbox: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            inbox.put_nowait(msg)

        sub = await self.js.subscribe(
            events_subject(job.id),
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            cb=on_msg,
        )
        try:
            await self.js.publish(
                jobs_subject(job.model),
                encode_job(job),
                stream=JOBS_STREAM,
                headers={"Nats-Msg-Id": job.id},
            )
        except BaseException:
            self._spawn(sub.unsubscribe())
            raise
        return JobStream(client=self, job=job, sub=sub, inbox=inbox)

    def cancel(self, job_id: str) -> None:
        """Fire-and-forget: safe to call from a cancelled task or a finally block."""
        self._spawn(self.nc.publish(cancel_subject(job_id), b""))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background_nats_call_failed", error=str(task.exception()))

    async def drain(self) -> None:
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
        self.finished = delta.finished
        return delta

    def request_cancel(self) -> None:
        """Ask the worker to abort; its final (abort) delta still arrives on this stream."""
        if not self.finished and not self.cancel_sent:
            self.cancel_sent = True
            self.client.cancel(self.job.id)

    def close(self) -> None:
        """Stop listening; a job that has not finished is cancelled on its worker."""
        if self.closed:
            return
        self.closed = True
        self.request_cancel()
        self.client._spawn(self.sub.unsubscribe())
