"""Moving jobs that exhausted their deliveries from LLM_JOBS to LLM_DEAD.

The primary path is in the worker: the consumer allows `max_deliver + 1` deliveries and
a worker that receives a job for the last one dead-letters it instead of running it. A
job that kills every worker it touches therefore never runs a last time, and the move
does not depend on anyone being subscribed at the right moment: the delivery waits in
JetStream until some worker takes it.

This janitor is the backstop for the one gap left, a message the server stopped
delivering (the worker holding its last delivery died): such a message stays in the
work-queue stream with nobody to deliver it to. Every worker runs a janitor that reacts
to the server's MAX_DELIVERIES advisory and, because a core-NATS advisory is lost when
nobody listens, also sweeps periodically for messages that sat undeliverable in an idle
queue for a whole interval. All of it is idempotent: LLM_DEAD deduplicates by
`Nats-Msg-Id`, and only the worker whose delete of the LLM_JOBS message succeeds
publishes the job's closing error Delta.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from shared.bus.dead_letters import NO_MESSAGE_FOUND, publish_dead_letter
from shared.bus.event_log import Appended, EventLog, append
from shared.bus.job_events import read_history
from shared.bus.subjects import JOBS_STREAM, consumer_name, events_subject, jobs_subject
from shared.messages import CompletionChunk, Delta, MessageError, decode_job, encode_delta
from shared.periodic import Periodic

ADVISORY_PREFIX = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def max_deliveries_advisory_subject(model: str) -> str:
    return f"{ADVISORY_PREFIX}.{JOBS_STREAM}.{consumer_name(model)}"


def dead_reason(deliveries: int) -> str:
    return (
        f"delivered {deliveries} times without finishing: every worker that ran it "
        "crashed, stalled or was stopped before the job completed"
    )


async def close_dead_job(
    js: JetStreamContext, job_id: str, n: int, reason: str, worker_id: str, retry_for_s: float
) -> Appended:
    """Publish the job's final error Delta after what is already stored, so streams end."""
    history = await read_history(js, job_id)
    if history.terminal:
        return Appended.STORED  # it did finish after all; nothing to close
    delta = Delta(
        job_id=job_id,
        seq=history.next_seq,
        chunks=[
            CompletionChunk(index=i, token_ids=[], finish_reason="error") for i in range(max(n, 1))
        ],
        finished=True,
        usage=history.usage,
        error=f"dead-lettered: {reason}",
        worker_id=worker_id,
    )
    log = EventLog(events_subject(job_id), fence=history.last_stream_seq)
    return await append(js, log, encode_delta(delta), retry_for_s)


def job_identity(data: bytes, headers: dict[str, str] | None) -> tuple[str, int] | None:
    """(job id, n) of a queued message; the Nats-Msg-Id when its body does not decode."""
    try:
        job = decode_job(data)
        return job.id, job.sampling.n
    except MessageError:
        msg_id = (headers or {}).get("Nats-Msg-Id", "")
        try:
            events_subject(msg_id)
        except ValueError:
            return None
        return msg_id, 1


@dataclass
class Janitor:
    nc: NATS
    js: JetStreamContext
    model: str
    worker_id: str
    sweep_interval_s: float
    retry_for_s: float
    log: Any
    on_dead: Callable[[str], None] = lambda reason: None  # metrics hook
    _suspects: set[int] = field(default_factory=set)
    _sub: Any = None
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _sweeper: Periodic | None = None

    async def start(self) -> None:
        """Listen for the advisory and sweep every `sweep_interval_s`."""
        self._sub = await self.nc.subscribe(
            max_deliveries_advisory_subject(self.model), cb=self._on_advisory
        )
        self._sweeper = Periodic(
            "janitor", self.sweep, self.sweep_interval_s, first_now=False, log=self.log
        )
        self._sweeper.start()

    async def stop(self) -> None:
        if self._sweeper is not None:
            await self._sweeper.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
        except (ValueError, KeyError, TypeError):
            self.log.warning("bad_max_deliveries_advisory", data=msg.data[:200])
            return
        # Off the subscription callback: the move takes several round trips.
        task = asyncio.create_task(self.move(seq, deliveries, "advisory"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sweep(self) -> int:
        """Dead-letter messages undeliverable for a whole interval; how many were moved.

        With nothing pending and nothing awaiting an ack, any message of this model still
        in the work queue at or below the last delivered sequence can only be one the
        server gave up on. Seen twice in a row it is moved.
        """
        info = await self.js.consumer_info(JOBS_STREAM, consumer_name(self.model))
        if info.num_pending or info.num_ack_pending:
            self._suspects.clear()
            return 0
        last_delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
        found: set[int] = set()
        seq = 1
        while seq <= last_delivered:
            try:
                raw = await self.js.get_msg(
                    JOBS_STREAM, seq=seq, subject=jobs_subject(self.model), next=True
                )
            except NotFoundError:
                break
            if int(raw.seq) > last_delivered:
                break
            found.add(int(raw.seq))
            seq = int(raw.seq) + 1
        confirmed = found & self._suspects
        self._suspects = found - confirmed
        max_deliver = int(info.config.max_deliver or 0)
        for s in sorted(confirmed):
            await self.move(s, max_deliver, "sweep")
        return len(confirmed)

    async def move(self, jobs_seq: int, deliveries: int, source: str) -> bool:
        """Copy LLM_JOBS message `jobs_seq` to LLM_DEAD, delete it, close its stream."""
        try:
            raw = await self.js.get_msg(JOBS_STREAM, seq=jobs_seq)
        except NotFoundError:
            return False  # another worker moved it, or it was acked after all
        data = raw.data or b""
        identity = job_identity(data, raw.headers)
        job_id, n = identity if identity is not None else (f"seq-{jobs_seq}", 1)
        reason = dead_reason(deliveries)
        await publish_dead_letter(
            self.js, data, job_id, self.model, reason, deliveries, self.worker_id, jobs_seq
        )
        try:
            await self.js.delete_msg(JOBS_STREAM, jobs_seq)
        except APIError as e:
            if e.err_code == NO_MESSAGE_FOUND:
                return False  # a janitor elsewhere got there first and closes the job
            raise
        self.log.warning(
            "job_dead_lettered", job_id=job_id, deliveries=deliveries, source=source, reason=reason
        )
        self.on_dead(source)
        if identity is not None:
            await close_dead_job(self.js, job_id, n, reason, self.worker_id, self.retry_for_s)
        return True
