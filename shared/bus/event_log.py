"""Appending a job's Deltas to LLM_EVENTS so that only the job's current owner can.

Each publish carries `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the
job's previous Delta (0 for none). If another worker appended in between (it took the
job over because ours looked dead), the server rejects the publish and this worker
learns it lost the job: it stops, and the job's log never gets two writers, duplicate
seqs or interleaved tokens. A retried publish whose first attempt did land is told
apart by comparing the stored bytes with ours.

Transient failures (NATS restarting) are retried until a deadline: a Delta is never
skipped, because a gap would lose tokens for every reader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from shared.bus.subjects import EVENTS_STREAM
from shared.retry import RetryPolicy, retry

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071
PUBLISH_TIMEOUT_S = 2.0
APPEND_RETRY = RetryPolicy(deadline_s=30.0, base_delay_s=0.2, max_delay_s=1.0)


class Appended(enum.Enum):
    STORED = "stored"
    LOST = "lost"  # someone else appended to this job's log: we no longer own the job
    FAILED = "failed"  # NATS did not take it before the deadline


@dataclass
class EventLog:
    """Where a job's next Delta goes and what the log's tail must be for it to land."""

    subject: str
    fence: int = 0  # LLM_EVENTS sequence of the job's last stored Delta, 0 for none


async def append(
    js: JetStreamContext,
    log: EventLog,
    data: bytes,
    retry_for_s: float,
    on_retry: Callable[[int, Exception], None] | None = None,
) -> Appended:
    """Store `data` as the log's next entry; advance the fence on success."""

    async def attempt() -> Appended:
        try:
            ack = await js.publish(
                log.subject,
                data,
                timeout=PUBLISH_TIMEOUT_S,
                headers={EXPECTED_LAST_SUBJECT_SEQ: str(log.fence)},
            )
        except APIError as e:
            if e.err_code != WRONG_LAST_SEQUENCE:
                raise
            return await _after_fence_conflict(js, log, data)
        log.fence = int(ack.seq)
        return Appended.STORED

    # Timeouts, disconnects, no responders while NATS restarts: retried until the deadline.
    policy = dataclasses.replace(APPEND_RETRY, deadline_s=retry_for_s)
    try:
        return await retry(attempt, policy, on_retry)
    except Exception:
        return Appended.FAILED


async def _after_fence_conflict(js: JetStreamContext, log: EventLog, data: bytes) -> Appended:
    """Our own earlier attempt may have landed (its ack was lost): then it is stored."""
    try:
        last = await js.get_last_msg(EVENTS_STREAM, log.subject)
    except NotFoundError:
        return Appended.LOST
    except Exception:
        return Appended.LOST  # cannot tell: stepping back is the safe side
    if last.data == data and int(last.seq or 0) > log.fence:
        log.fence = int(last.seq)
        return Appended.STORED
    return Appended.LOST


# -- one acknowledged store for many jobs' Deltas (an engine step) ------------------------

BATCH_ID = "Nats-Batch-Id"
BATCH_SEQ = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
MAX_ATOMIC_BATCH = 1000  # nats-server's limit on messages in one atomic batch


def batch_frames(batch_id: str, entries: list[tuple[EventLog, bytes]]) -> bytes:
    """HPUB frames of a batch's messages, numbered from 1, each with its own fence.

    One pass with the header bytes every message shares built once: per message only
    its number, fence and sizes are formatted (this runs for every Delta of a step).
    """
    shared = f"NATS/1.0\r\n{BATCH_ID}: {batch_id}\r\n{BATCH_SEQ}: "  # ASCII: len is bytes
    fence_key = f"\r\n{EXPECTED_LAST_SUBJECT_SEQ}: "
    parts: list[bytes] = []
    for i, (log, data) in enumerate(entries, start=1):
        own = f"{shared}{i}{fence_key}{log.fence}\r\n\r\n"
        hlen = len(own)
        parts += (f"HPUB {log.subject} {hlen} {hlen + len(data)}\r\n{own}".encode(), data, b"\r\n")
    return b"".join(parts)


async def append_batch(
    nc: NATS,
    js: JetStreamContext,
    entries: list[tuple[EventLog, bytes]],
    retry_for_s: float,
    on_retry=None,
) -> list[Appended]:
    """Store one Delta for each of several jobs with one acknowledged atomic batch.

    Every message keeps its own subject and its own fence
    (`Nats-Expected-Last-Subject-Sequence`), so the log of each job stays exactly what
    `append` would make it; the server checks all fences at commit and stores all or
    none, and its single PubAck gives the last sequence, from which each message's is
    known (a batch is stored contiguously). At most one entry per log.

    If the batch is refused (a fence moved: some job was taken over; or the server is
    busy or restarting), nothing was stored, and each entry is appended on its own with
    `append`, which tells the lost job from the others and retries transient failures.
    A commit whose ack was lost is recognised there too (the stored bytes are ours).
    """
    if len(entries) <= 1 or len(entries) > MAX_ATOMIC_BATCH:
        if len(entries) > MAX_ATOMIC_BATCH:
            head = await append_batch(nc, js, entries[:MAX_ATOMIC_BATCH], retry_for_s, on_retry)
            tail = await append_batch(nc, js, entries[MAX_ATOMIC_BATCH:], retry_for_s, on_retry)
            return head + tail
        return await _one_by_one(js, entries, retry_for_s, on_retry)
    batch_id = uuid.uuid4().hex
    last = len(entries)
    try:
        await nc._send_command(batch_frames(batch_id, entries[:-1]))  # all but the commit
        log, data = entries[-1]
        reply = await nc.request(
            log.subject, data, timeout=PUBLISH_TIMEOUT_S,
            headers=_commit_headers(batch_id, last, log.fence),
        )  # fmt: skip
        ack = json.loads(reply.data)
    except Exception:  # timeouts, disconnected: whether it landed is settled one by one
        ack = {}
    if "error" in ack or int(ack.get("count", 0)) != last:
        return await _one_by_one(js, entries, retry_for_s, on_retry)
    first_seq = int(ack["seq"]) - last + 1
    for i, (log, _) in enumerate(entries):
        log.fence = first_seq + i
    return [Appended.STORED] * last


def _commit_headers(batch_id: str, index: int, fence: int) -> dict[str, str]:
    return {
        BATCH_ID: batch_id,
        BATCH_SEQ: str(index),
        EXPECTED_LAST_SUBJECT_SEQ: str(fence),
        BATCH_COMMIT: "1",
    }


async def _one_by_one(
    js: JetStreamContext, entries: list[tuple[EventLog, bytes]], retry_for_s: float, on_retry
) -> list[Appended]:
    return list(
        await asyncio.gather(
            *(append(js, log, data, retry_for_s, on_retry) for log, data in entries)
        )
    )
