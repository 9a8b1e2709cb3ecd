"""Routed jobs that their worker does not run go to the shared queue, exactly once.

A job routed to worker W waits on `llm.jobs.<model>.w.<W>`, read only through W's
durable consumer. The rule that makes a routed job run at most once per delivery, with
no claim store:

- A routed message runs only on its FIRST delivery (num_delivered == 1), and only by
  W. JetStream hands a delivery to exactly one pull request, so either W got it (and
  runs it) or a mover did.
- Every other delivery of it (a mover's, or any redelivery: W died, was drained, or let
  ack_wait lapse) is MOVED: the bytes are published to the shared subject with
  `Nats-Msg-Id: <job id>.fallback`, then the routed delivery is acked. A mover that dies
  between the two leaves the message to be redelivered and moved again; the server drops
  the second copy as a duplicate (LLM_JOBS' duplicate window, 120 s, is longer than the
  ack wait that separates the two). So at most one shared copy exists, and no routed
  delivery after the first ever runs beside it.
- The copy carries `Jetserve-Prior-Runs` (deliveries W may have run), which the intake
  adds to the shared consumer's count, so dead-lettering counts a routed job's runs too.

Movers: W itself (a redelivery it pulls, its backlog when it drains) and every worker of
the model, whose sweeper binds to W's consumer when W's oldest unpulled job is older than
`--route-fallback`, or when W has left the registry (everything, redeliveries included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared.bus.jetstream import ensure_routed_consumer
from shared.bus.subjects import (
    JOBS_STREAM,
    jobs_subject,
    routed_consumer_name,
    routed_jobs_wildcard,
    worker_key,
    worker_of_routed_subject,
)
from shared.metrics import WorkerMetrics
from shared.settings import BusSettings

PRIOR_RUNS_HEADER = "Jetserve-Prior-Runs"
FALLBACK_SUFFIX = ".fallback"
MOVE_BATCH = 64


def prior_runs(msg: Msg) -> int:
    """Runs a moved job had before it reached the shared queue (0 for any other)."""
    value = (msg.headers or {}).get(PRIOR_RUNS_HEADER, "0")
    try:
        return min(max(int(value), 0), 1000)
    except ValueError:
        return 0


def is_routed(msg: Msg, model: str) -> bool:
    return msg.subject != jobs_subject(model)


def num_delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:
        return 1


def is_stale(msg: Msg, ack_wait_s: float) -> bool:
    """Stored longer ago than an ack wait: if this delivery sat in a frozen process's
    buffer, the server has redelivered it meanwhile (and a mover moved it), so a first
    delivery this old must not run; moving it again is harmless (deduplicated)."""
    try:
        stored = msg.metadata.timestamp.timestamp()
    except Exception:
        return False
    return time.time() - stored > ack_wait_s


async def fetch_no_wait(nc: NATS, durable: str, batch: int, timeout_s: float = 2.0) -> list[Msg]:
    """What the consumer can deliver right now, up to `batch`, without a lingering pull:
    a job published a moment later must stay for its own worker, not land here."""
    inbox = nc.new_inbox()
    got: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        got.put_nowait(msg)

    sub = await nc.subscribe(inbox, cb=on_msg)
    out: list[Msg] = []
    try:
        request = json.dumps({"batch": batch, "no_wait": True}).encode()
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{durable}", request, reply=inbox)
        deadline = time.monotonic() + timeout_s
        while len(out) < batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(got.get(), left)
            except TimeoutError:
                break
            if (msg.headers or {}).get("Status"):
                break  # 404 no messages, 408 request expired: nothing more now
            out.append(msg)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def move_to_shared(js: JetStreamContext, model: str, msg: Msg, runs: int) -> None:
    """Publish the routed job to the shared queue, then ack the routed delivery."""
    msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
    if not msg_id:
        msg_id = f"seq-{msg.metadata.sequence.stream}"
    headers = {"Nats-Msg-Id": msg_id + FALLBACK_SUFFIX, PRIOR_RUNS_HEADER: str(runs)}
    await js.publish(jobs_subject(model), msg.data, stream=JOBS_STREAM, headers=headers)
    await msg.ack()


@dataclass
class RoutedSweeper:
    """Moves jobs waiting too long on any worker's routed subject of this model."""

    nc: NATS
    js: JetStreamContext
    registry: KeyValue  # llm_workers: who is live
    model: str
    worker_id: str
    settings: BusSettings
    metrics: WorkerMetrics
    log: Any

    async def sweep(self) -> None:
        try:
            info = await self.js.stream_info(
                JOBS_STREAM, subjects_filter=routed_jobs_wildcard(self.model)
            )
        except NotFoundError:
            return
        for subject, count in (info.state.subjects or {}).items():
            if count:
                await self._sweep_subject(subject)

    async def _sweep_subject(self, subject: str) -> None:
        owner = worker_of_routed_subject(subject)
        live = owner == self.worker_id or await self._is_live(owner)
        durable = routed_consumer_name(self.model, owner)
        try:
            info = await self.js.consumer_info(JOBS_STREAM, durable)
        except NotFoundError:
            if live:
                return  # its owner is starting and creates it
            # Deleted while idle (inactive threshold) with jobs left: make it again.
            await ensure_routed_consumer(self.js, self.model, owner, self.settings)
            info = await self.js.consumer_info(JOBS_STREAM, durable)
        if live:
            pending, held = int(info.num_pending or 0), int(info.num_ack_pending or 0)
            if pending:
                if not await self._oldest_unpulled_is_old(subject, info):
                    return
                reason, batch = "not_pulled", min(pending, MOVE_BATCH)
            elif held:
                # Nothing unpulled, so a no-wait fetch returns only deliveries whose ack
                # wait ran out (a frozen owner): redeliveries, moved.
                reason, batch = "redelivered", min(held, MOVE_BATCH)
            else:
                return
        else:
            reason = "worker_gone"
            batch = min(int(info.num_pending or 0) + int(info.num_ack_pending or 0), MOVE_BATCH)
            if batch <= 0:
                return
        await self._move(durable, batch, reason)

    async def _is_live(self, worker_id: str) -> bool:
        try:
            entry = await self.registry.get(worker_key(self.model, worker_id))
            return bool(entry.value)
        except KeyNotFoundError:
            return False

    async def _oldest_unpulled_is_old(self, subject: str, info: Any) -> bool:
        after = int(info.delivered.stream_seq or 0) if info.delivered else 0
        try:
            head = await self.js.get_msg(JOBS_STREAM, seq=after + 1, subject=subject, next=True)
        except NotFoundError:
            return False
        if head.time is None:
            return True
        return time.time() - head.time.timestamp() >= self.settings.route_fallback_s

    async def _move(self, durable: str, batch: int, reason: str) -> None:
        msgs = await fetch_no_wait(self.nc, durable, batch)
        for msg in msgs:
            # This delivery was never run; the ones before it may have been.
            runs = num_delivered(msg) - 1 + prior_runs(msg)
            try:
                await move_to_shared(self.js, self.model, msg, runs)
            except Exception as e:  # left unacked: redelivered and moved again
                self.log.warning("routed_move_failed", error=f"{type(e).__name__}: {e}")
                continue
            why = "redelivered" if reason == "not_pulled" and runs else reason
            self.metrics.routed_fallbacks.labels(model_name=self.model, reason=why).inc()
            self.log.info(
                "routed_job_moved",
                reason=why,
                msg_id=(msg.headers or {}).get("Nats-Msg-Id", ""),
                from_subject=msg.subject,
            )
