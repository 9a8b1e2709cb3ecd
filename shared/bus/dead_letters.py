"""LLM_DEAD: jobs that exhausted their deliveries, kept with the reason so they can be replayed.

A dead letter is the job's original bytes on `llm.dead.<model>` with headers saying why,
after how many deliveries, and which worker gave up. Writing one is idempotent
(`Nats-Msg-Id` = job id + its LLM_JOBS sequence) because several workers may race to
dead-letter the same message. Replaying republishes the bytes to the job's queue under
the same job id: the worker that picks it up finds the job's earlier Deltas in
LLM_EVENTS and continues after them, so a job that crashed half-way does not restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from shared.bus.subjects import DEAD_STREAM, DEAD_WILDCARD, dead_subject, jobs_subject
from shared.messages import Job, MessageError, decode_job

HDR_JOB_ID = "Jetserve-Job-Id"
HDR_MODEL = "Jetserve-Model"
HDR_REASON = "Jetserve-Dead-Reason"
HDR_DELIVERIES = "Jetserve-Deliveries"
HDR_WORKER = "Jetserve-Worker"
HDR_DEAD_AT = "Jetserve-Dead-At"
HDR_JOBS_SEQ = "Jetserve-Jobs-Seq"
NO_MESSAGE_FOUND = 10057  # delete of a message that is already gone


@dataclass
class DeadLetter:
    job_id: str
    model: str
    reason: str
    deliveries: int
    worker_id: str
    dead_at: float  # unix seconds
    dead_seq: int  # sequence in LLM_DEAD, what a replay deletes
    data: bytes  # the job exactly as it was queued

    @property
    def job(self) -> Job | None:
        try:
            return decode_job(self.data)
        except MessageError:
            return None


async def publish_dead_letter(
    js: JetStreamContext,
    data: bytes,
    job_id: str,
    model: str,
    reason: str,
    deliveries: int,
    worker_id: str,
    jobs_seq: int,
) -> None:
    headers = {
        "Nats-Msg-Id": f"dead-{job_id}-{jobs_seq}",
        HDR_JOB_ID: job_id,
        HDR_MODEL: model,
        HDR_REASON: reason[:1000],
        HDR_DELIVERIES: str(deliveries),
        HDR_WORKER: worker_id,
        HDR_DEAD_AT: f"{time.time():.3f}",
        HDR_JOBS_SEQ: str(jobs_seq),
    }
    await js.publish(dead_subject(model), data, stream=DEAD_STREAM, headers=headers)


def _from_headers(headers: dict[str, str], data: bytes, dead_seq: int) -> DeadLetter:
    def num(key: str, cast):
        try:
            return cast(headers.get(key, 0))
        except ValueError:
            return cast(0)

    return DeadLetter(
        job_id=headers.get(HDR_JOB_ID, ""),
        model=headers.get(HDR_MODEL, ""),
        reason=headers.get(HDR_REASON, ""),
        deliveries=num(HDR_DELIVERIES, int),
        worker_id=headers.get(HDR_WORKER, ""),
        dead_at=num(HDR_DEAD_AT, float),
        dead_seq=dead_seq,
        data=data,
    )


async def list_dead_letters(js: JetStreamContext, timeout_s: float = 10.0) -> list[DeadLetter]:
    """Every dead letter, oldest first (a short-lived ephemeral consumer reads LLM_DEAD)."""
    info = await js.stream_info(DEAD_STREAM)
    if not info.state.messages:
        return []
    last = int(info.state.last_seq)
    sub = await js.pull_subscribe(
        DEAD_WILDCARD,
        stream=DEAD_STREAM,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
        ),
    )
    letters: list[DeadLetter] = []
    try:
        while True:
            msgs: list[Msg] = await sub.fetch(256, timeout=timeout_s)
            for msg in msgs:
                seq = int(msg.metadata.sequence.stream)
                letters.append(_from_headers(dict(msg.headers or {}), msg.data, seq))
                if seq >= last:
                    return letters
    finally:
        await sub.unsubscribe()


async def replay(js: JetStreamContext, letter: DeadLetter) -> None:
    """Queue the job again under its id, then drop the dead letter.

    The publish id is tied to the dead letter, so replaying the same letter twice (a
    retry after a crash between the two steps) queues the job only once.
    """
    await js.publish(
        jobs_subject(letter.model),
        letter.data,
        headers={"Nats-Msg-Id": f"{letter.job_id}-replay-{letter.dead_seq}"},
    )
    try:
        await js.delete_msg(DEAD_STREAM, letter.dead_seq)
    except APIError as e:
        if e.err_code != NO_MESSAGE_FOUND:
            raise
