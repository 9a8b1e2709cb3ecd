"""Keep this replica's PrefixIndex in step with every worker's KV events.

Subscribes to `llm.kv.>` (core NATS: at most once). An event that skips a seq, a
heartbeat in the registry whose (epoch, seq) is ahead of the index, or a worker seen
for the first time mid-stream, makes the listener ask that worker for a snapshot
(request on `llm.kvsnap.<model>.<worker>`, the parts answered to one inbox); at most one
request per worker is in flight. Workers that left the registry are dropped from the
index. Malformed messages are logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.api.model_registry import ModelRegistry
from services.api.routing.prefix_index import PrefixIndex
from shared.bus.kv_events import KvSnapshot, decode_kv_events, decode_kv_snapshot, merge_parts
from shared.bus.subjects import KV_EVENTS_WILDCARD, kv_snapshot_subject
from shared.messages import MessageError
from shared.metrics import ApiMetrics
from shared.periodic import Periodic

log = structlog.get_logger("jetserve.api.routing")

SNAPSHOT_TIMEOUT_S = 5.0
SNAPSHOT_RETRY_S = 1.0  # a failed snapshot request is tried again after this long
CHECK_INTERVAL_S = 1.0  # registry heads and departures


@dataclass
class KvListener:
    nc: NATS
    index: PrefixIndex
    registry: ModelRegistry
    metrics: ApiMetrics | None = None
    _sub: Any = None
    _periodic: Periodic | None = None
    _in_flight: dict[str, asyncio.Task] = field(default_factory=dict)
    _last_try: dict[str, float] = field(default_factory=dict)
    _models: dict[str, str] = field(default_factory=dict)  # worker id -> model subject token

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(KV_EVENTS_WILDCARD, cb=self._on_event)
        self._periodic = Periodic("kv-index-check", self.check, CHECK_INTERVAL_S, log=log)
        self._periodic.start()

    async def stop(self) -> None:
        if self._periodic is not None:
            await self._periodic.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def _on_event(self, msg: Msg) -> None:
        try:
            ev = decode_kv_events(msg.data)
        except MessageError as e:
            log.warning("kv_event_malformed", subject=msg.subject, error=str(e))
            return
        parts = msg.subject.split(".")  # llm.kv.<model>.<worker>
        if len(parts) != 4 or parts[3] != ev.worker_id:
            log.warning("kv_event_subject_mismatch", subject=msg.subject, worker=ev.worker_id)
            return
        self._models[ev.worker_id] = parts[2]
        if self.index.apply_events(ev):
            self.request_snapshot(parts[2], ev.worker_id)
        self._gauge()

    def request_snapshot(self, model: str, worker_id: str, force: bool = False) -> None:
        """Ask for one snapshot unless one is on its way (or failed less than a retry ago)."""
        if worker_id in self._in_flight:
            return
        now = time.monotonic()
        if not force and now - self._last_try.get(worker_id, -1e9) < SNAPSHOT_RETRY_S:
            return
        self._last_try[worker_id] = now
        task = asyncio.create_task(self._snapshot(model, worker_id), name="kv-snapshot")
        self._in_flight[worker_id] = task
        task.add_done_callback(lambda _: self._in_flight.pop(worker_id, None))

    async def fetch_snapshot(self, model: str, worker_id: str) -> KvSnapshot:
        """All parts of one snapshot from the worker (TimeoutError if it does not answer)."""
        inbox = self.nc.new_inbox()
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_part(msg: Msg) -> None:
            got.put_nowait(msg.data)

        sub = await self.nc.subscribe(inbox, cb=on_part)
        try:
            await self.nc.publish(kv_snapshot_subject(model, worker_id), b"", reply=inbox)
            parts: list[KvSnapshot] = []
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
            while not parts or len(parts) < parts[0].parts:
                left = deadline - time.monotonic()
                parts.append(decode_kv_snapshot(await asyncio.wait_for(got.get(), left)))
            return merge_parts(parts)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _snapshot(self, model: str, worker_id: str) -> None:
        outcome = "applied"
        try:
            snap = await self.fetch_snapshot(model, worker_id)
            if snap.worker_id != worker_id:
                raise MessageError(f"snapshot of {snap.worker_id!r}, asked {worker_id!r}")
            still_stale = self.index.apply_snapshot(snap)
            log.info(
                "kv_snapshot_applied",
                worker_id=worker_id,
                seq=snap.seq,
                blocks=len(snap.hashes),
                still_stale=still_stale,
            )
        except (TimeoutError, MessageError) as e:
            outcome = "failed"
            log.warning("kv_snapshot_failed", worker_id=worker_id, error=f"{type(e).__name__}: {e}")
        except Exception as e:  # NATS down or reconnecting: tried again by check()
            outcome = "failed"
            log.warning("kv_snapshot_failed", worker_id=worker_id, error=f"{type(e).__name__}: {e}")
        if self.metrics is not None:
            self.metrics.kv_index_snapshots.labels(outcome).inc()
        self._gauge()

    async def check(self) -> None:
        """Registry heads ahead of the index ask for a snapshot; departed workers are dropped."""
        live = {e.status.worker_id: e.status for e in self.registry.live_workers()}
        for worker_id in [w for w in self.index.workers if w not in live]:
            self.index.drop_worker(worker_id)
            self._models.pop(worker_id, None)
        for worker_id, status in live.items():
            if not status.routed_subject and not status.kv_epoch:
                continue  # a worker that announces nothing
            if self.index.check_head(worker_id, status.kv_epoch, status.kv_seq):
                self.request_snapshot(status.model, worker_id)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.kv_index_blocks.set(self.index.num_blocks())
