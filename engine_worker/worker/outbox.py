"""The worker's Delta publishing path: queue, fenced append to LLM_EVENTS, then settle.

Everything a worker says about a job goes through one queue drained by one task, so a
job's Deltas are stored in seq order (a job at most once in a batch). What arrives while
a batch is being stored waits as the next batch, where a job's later Deltas merge into
its waiting one (`absorb`): one batch in flight and one waiting, however fast the engine
steps, so the log never falls behind the engine by more than a store's round trip. A
merged Delta stops growing at MERGED_DELTA_BYTES (a long store outage with logprobs or
n > 1 would otherwise build one larger than NATS's max_payload): the job's next Delta then
waits in the batch after it. A batch is stored with one atomic batch publish and one ack
(`append_batch`), each Delta on its job's subject and fenced on the job's previous Delta
(shared/bus/event_log.py): a worker that lost the job to a takeover learns it here and
drops the job without acking. Once stored, the batch's Deltas go to the API replicas that
follow their jobs, one core message per replica (shared/bus/step_delivery.py). A job's
message is acked (or terminated) only after its final Delta is stored, so a crash before
that means redelivery, never a lost request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from engine_worker.worker.job_state import JobState, merge_chunks
from engine_worker.worker.running import RunningJobs
from shared.bus.event_log import Appended, append_batch
from shared.bus.step_delivery import deliver_step
from shared.messages import CompletionChunk, Delta, encode_delta
from shared.metrics import WorkerMetrics
from shared.retry import RetryPolicy, retry

PUBLISH_RETRY = RetryPolicy(attempts=3, base_delay_s=0.2)  # an unfenced error Delta
APPEND_RETRY_S = 30.0  # a Delta is retried this long (NATS restarting) before the job is dropped
# A merged Delta's estimated encoded size past which a job's later Deltas are not merged
# into it: a quarter of nats-server's default max_payload (1 MiB).
MERGED_DELTA_BYTES = 256 * 1024


@dataclass
class Outgoing:
    """A Delta to store, and what to do with the job's message once it is stored."""

    state: JobState
    delta: Delta
    action: str | None = None  # None (more to come), "ack" or "term"
    _size: int = -1  # the Delta's estimated encoded bytes, once asked for

    @property
    def size(self) -> int:
        """Counted only when a Delta may merge (the store lags), not on every step."""
        if self._size < 0:
            self._size = chunks_size(self.delta.chunks) + 4 * len(self.delta.embedding or ())
        return self._size


def chunks_size(chunks: list[CompletionChunk]) -> int:
    """An upper estimate of chunks' msgpack bytes, from counts alone (no encoding): a
    token id takes at most 5 bytes, a logprob entry a float64 and its alternatives'."""
    size = 0
    for c in chunks:
        size += 16 + 5 * len(c.token_ids)
        for _, _, top in c.logprobs or ():
            size += 16 + 15 * len(top)
    return size


def absorb(waiting: Outgoing, later: Outgoing) -> None:
    """Merge a job's next Delta into its Delta still waiting to be stored: one Delta, one
    seq and one message for both; the job's numbering gives back the seq `later` took."""
    first, then = waiting.delta, later.delta
    assert then.seq == first.seq + 1 == later.state.next_seq - 1, "absorb out of order"
    first.chunks = merge_chunks(first.chunks, then.chunks)
    first.finished = then.finished
    first.usage = then.usage or first.usage
    first.error = then.error or first.error
    first.embedding = then.embedding if then.embedding is not None else first.embedding
    waiting.action = later.action or waiting.action
    waiting._size = waiting.size + later.size
    later.state.next_seq -= 1


@dataclass
class Outbox:
    nc: NATS
    js: JetStreamContext
    jobs: RunningJobs  # a settled or dropped job is forgotten here
    abort: Callable[[str], None]  # stops an engine request: a dropped job must not run on
    metrics: WorkerMetrics
    model_name: str
    log: Any
    retry_for_s: float = APPEND_RETRY_S
    # An optimistic job (job_state.py) whose log turned out not to be empty: restart it from
    # the log (Intake.restart_from_log). Unset: such a job is dropped to redelivery.
    on_log_found: Callable[[JobState], None] | None = None
    # The batches waiting behind the one in flight, oldest first (numbered from
    # `_first_waiting`); there is more than one only when a merged Delta reached
    # MERGED_DELTA_BYTES. A job's latest waiting Delta and its batch's number, keyed by
    # the JobState's identity (a restarted job is new): its next Delta merges into it.
    _waiting: deque[list[Outgoing]] = field(default_factory=deque)
    _first_waiting: int = 0
    _latest: dict[int, tuple[int, Outgoing]] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False

    def enqueue(self, batch: list[Outgoing]) -> None:
        for out in batch:
            latest = self._latest.get(id(out.state))
            if latest is None:
                number = self._first_waiting
            elif latest[1].size + out.size <= MERGED_DELTA_BYTES:
                absorb(latest[1], out)
                continue
            else:  # full: the job's next Delta waits one batch later
                number = latest[0] + 1
            while number >= self._first_waiting + len(self._waiting):
                self._waiting.append([])
            self._waiting[number - self._first_waiting].append(out)
            self._latest[id(out.state)] = (number, out)
        if batch:
            self._wake.set()

    def _take(self) -> list[Outgoing]:
        """The oldest waiting batch, whose Deltas no later one merges into any more."""
        if not self._waiting:
            return []
        batch = self._waiting.popleft()
        for out in batch:
            if self._latest[id(out.state)][1] is out:
                del self._latest[id(out.state)]
        self._first_waiting += 1
        return batch

    def close(self) -> None:
        """`run` returns after storing everything enqueued before this."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """Store the waiting Deltas in order (a job's seq never overtakes), then settle."""
        while True:
            if not self._waiting:
                await self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if batch:
                try:
                    await self._store_and_settle(batch)
                except Exception as e:  # a bug must not silently stop all publishing
                    self.log.error("publisher_failed", error=f"{type(e).__name__}: {e}")
            if self._closed and not self._waiting:
                return

    async def publish(self, subject: str, data: bytes) -> bool:
        """Unfenced JetStream publish (for a job with no log of its own), briefly retried."""

        def on_retry(attempt: int, error: Exception) -> None:
            self.log.warning("publish_failed", subject=subject, attempt=attempt, error=str(error))

        try:
            await retry(lambda: self.js.publish(subject, data), PUBLISH_RETRY, on_retry)
            return True
        except Exception as e:
            self.log.warning("publish_failed", subject=subject, error=str(e))
            return False

    def _on_retry(self, attempt: int, error: Exception) -> None:
        self.log.warning("publish_retry", attempt=attempt, error=str(error))

    async def _store(self, batch: list[Outgoing]) -> list[Appended]:
        """One atomic batch: a job has at most one Delta in it, so seq order holds.
        What was stored then goes to the API replicas that follow those jobs."""
        live = [o for o in batch if not o.state.lost]
        entries = [(o.state.events, encode_delta(o.delta)) for o in live]
        stored = await append_batch(self.nc, self.js, entries, self.retry_for_s, self._on_retry)  # type: ignore[arg-type]
        await deliver_step(
            self.nc,
            (
                (o.state.job.reply_to, data)
                for o, (_, data), r in zip(live, entries, stored, strict=True)
                if r is Appended.STORED
            ),
        )
        by_out = {id(o): r for o, r in zip(live, stored, strict=True)}
        return [by_out.get(id(o), Appended.LOST) for o in batch]

    async def _store_and_settle(self, batch: list[Outgoing]) -> None:
        stored = await self._store(batch)
        for out, result in zip(batch, stored, strict=True):
            if result is not Appended.STORED:
                self._drop(out.state, result)
                continue
            out.state.optimistic = False  # its log was empty: the job is ours as started
            if out.action is not None:
                await self._settle(out)

    async def _settle(self, out: Outgoing) -> None:
        self.jobs.forget(out.state)
        try:
            if out.action == "ack":
                await out.state.msg.ack()
            else:
                await out.state.msg.term()
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
        self.jobs.forget(state)
        if state.request_id:
            self.abort(state.request_id)
        if result is Appended.LOST and state.optimistic and self.on_log_found is not None:
            # Not a takeover: the log had Deltas before this worker started the job.
            self.log.info("job_log_found", job_id=state.id)
            self.on_log_found(state)
            return
        if result is Appended.LOST:
            self.metrics.jobs_lost.labels(model_name=self.model_name).inc()
        self.log.warning("job_dropped", job_id=state.id, reason=result.value)
