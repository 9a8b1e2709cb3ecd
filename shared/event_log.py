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
import enum
import time
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from shared.subjects import EVENTS_STREAM

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071
PUBLISH_TIMEOUT_S = 2.0


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
    on_retry=None,
) -> Appended:
    """Store `data` as the log's next entry; advance the fence on success."""
    deadline = time.monotonic() + retry_for_s
    attempt = 0
    while True:
        attempt += 1
        try:
            ack = await js.publish(
                log.subject,
                data,
                timeout=PUBLISH_TIMEOUT_S,
                headers={EXPECTED_LAST_SUBJECT_SEQ: str(log.fence)},
            )
            log.fence = int(ack.seq)
            return Appended.STORED
        except APIError as e:
            if e.err_code != WRONG_LAST_SEQUENCE:
                error: Exception = e
            else:
                return await _after_fence_conflict(js, log, data)
        except Exception as e:  # timeouts, disconnected, no responders while restarting
            error = e
        if time.monotonic() >= deadline:
            return Appended.FAILED
        if on_retry is not None:
            on_retry(attempt, error)
        await asyncio.sleep(min(0.1 * 2**attempt, 1.0))


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
