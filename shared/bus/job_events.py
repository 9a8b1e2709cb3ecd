"""A job's Deltas as stored in LLM_EVENTS, read back and folded into what the job produced.

LLM_EVENTS is the job's durable log: a worker that takes over a redelivered job reads it
to continue where the last one stopped, the jobs API reads it to report status and to
resume a stream after a given event, and the dead-letter tools read it to see how far a
job got. One fold rule serves all of them, so they agree on what a job has produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.bus.subjects import EVENTS_STREAM, events_subject
from shared.messages import Delta, MessageError, Usage, decode_delta

READ_TIMEOUT_S = 10.0
# Messages per direct-get batch: a 1,500-Delta job is read in two round trips, with no
# consumer created on the server (LLM_EVENTS has allow_direct).
DIRECT_BATCH = 1000


@dataclass
class JobHistory:
    """What a job's stored Deltas add up to.

    `finished`/`error` describe the latest state: a job that was dead-lettered (error)
    and then replayed continues with later Deltas, which supersede the error.
    """

    job_id: str
    next_seq: int = 0
    token_ids: dict[int, list[int]] = field(default_factory=dict)  # per completion index
    finish_reasons: dict[int, str] = field(default_factory=dict)
    finished: bool = False
    error: str | None = None
    usage: Usage | None = None
    last_stream_seq: int = 0  # LLM_EVENTS sequence of the last Delta (the publish fence)
    num_deltas: int = 0
    worker_ids: list[str] = field(default_factory=list)  # in order of first appearance

    @property
    def terminal(self) -> bool:
        """Finished for good: nothing left to run (an error may still be replayed)."""
        return self.finished and self.error is None

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids.values())

    def resume_token_ids(self, n: int) -> list[list[int]]:
        """Per completion index, the tokens to continue from (what the engine resumes)."""
        return [list(self.token_ids.get(i, [])) for i in range(n)]


def fold(history: JobHistory, delta: Delta) -> bool:
    """Apply one Delta in seq order; False (and no change) for a duplicate seq."""
    if delta.seq < history.next_seq:
        return False
    history.next_seq = delta.seq + 1
    history.num_deltas += 1
    if delta.worker_id and delta.worker_id not in history.worker_ids:
        history.worker_ids.append(delta.worker_id)
    for chunk in delta.chunks:
        history.token_ids.setdefault(chunk.index, []).extend(chunk.token_ids)
        if chunk.finish_reason is not None and chunk.finish_reason != "error":
            history.finish_reasons[chunk.index] = chunk.finish_reason
    history.finished = delta.finished
    history.error = delta.error if delta.finished else None
    if delta.usage is not None:
        history.usage = delta.usage
    return True


def fold_all(job_id: str, deltas: list[Delta]) -> JobHistory:
    history = JobHistory(job_id)
    for delta in deltas:
        fold(history, delta)
    return history


async def last_event_seq(js: JetStreamContext, job_id: str) -> int:
    """LLM_EVENTS sequence of the job's newest Delta, 0 when it has none."""
    try:
        msg = await js.get_last_msg(EVENTS_STREAM, events_subject(job_id))
    except NotFoundError:
        return 0
    return int(msg.seq or 0)


async def last_delta(js: JetStreamContext, job_id: str) -> Delta | None:
    """The job's newest stored Delta (one round trip), None when it has none."""
    try:
        msg = await js.get_last_msg(EVENTS_STREAM, events_subject(job_id))
    except NotFoundError:
        return None
    try:
        return decode_delta(msg.data or b"")
    except MessageError:
        return None


async def read_job_events(
    js: JetStreamContext, job_id: str, timeout_s: float = READ_TIMEOUT_S
) -> tuple[list[Delta], int]:
    """Every stored Delta of the job, oldest first, and the stream sequence of the last.

    Reads up to the message that was last when the read began, in batched direct gets
    (a few round trips however long the job, and no consumer on the server); malformed
    entries are skipped (they cannot be part of any history a reader could act on).
    """
    last = await last_event_seq(js, job_id)
    if last == 0:
        return [], 0
    deltas: list[Delta] = []
    start, got = 1, 0
    deadline = time.monotonic() + timeout_s
    while got < last:
        batch = await _direct_batch(js, events_subject(job_id), start, last, deadline)
        if not batch:
            break
        for seq, data in batch:
            with contextlib.suppress(MessageError):
                deltas.append(decode_delta(data))
            got = seq
        start = got + 1
    return deltas, got


async def _direct_batch(
    js: JetStreamContext, subject: str, start: int, up_to: int, deadline: float
) -> list[tuple[int, bytes]]:
    """(stream seq, data) of the next messages on `subject` from `start` through `up_to`.

    JetStream's batched direct get (nats-server 2.11+): one request, the messages stream
    back to an inbox, then an end-of-batch status. nats-py has no call for it yet, so it
    is spoken here on the client's own connection.
    """
    nc = js._nc  # the JetStreamContext's connection (nats-py keeps no public handle)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    request = {"seq": start, "next_by_subj": subject, "batch": DIRECT_BATCH, "up_to_seq": up_to}
    out: list[tuple[int, bytes]] = []
    try:
        await nc.publish(
            f"{js._prefix}.DIRECT.GET.{EVENTS_STREAM}", json.dumps(request).encode(), reply=inbox
        )
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"reading the events of {subject} timed out")
            msg = await sub.next_msg(timeout=remaining)
            status = (msg.headers or {}).get("Status")
            if status in ("204", "404"):  # end of batch / nothing (more) to read
                return out
            if status:
                raise NotFoundError(description=(msg.headers or {}).get("Description", status))
            out.append((int(msg.headers["Nats-Sequence"]), msg.data or b""))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(sub.unsubscribe())


async def read_history(
    js: JetStreamContext, job_id: str, timeout_s: float = READ_TIMEOUT_S
) -> JobHistory:
    deltas, last = await read_job_events(js, job_id, timeout_s)
    history = fold_all(job_id, deltas)
    history.last_stream_seq = last
    return history
