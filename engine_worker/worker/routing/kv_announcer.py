"""Tell the API replicas which KV blocks this worker holds, so they can route by prefix.

After every engine step that changed the prefix cache, one `KvEvents` message (the
hashes stored and evicted, net, by that step) goes out on the core subject
`llm.kv.<model>.<worker>`: one publish per step, never one per block. The announcer
keeps its own copy of the set it announced (applied in the same order as the events)
so a snapshot request (`llm.kvsnap.<model>.<worker>`) is answered from the loop at
once, consistent with the seq it names, without asking the engine thread. `epoch` is
fixed per process: a restarted worker with the same id starts a new one, and readers
drop what the old process announced. Publishing is fire-and-forget: a message lost
while NATS reconnects is a seq gap the readers repair with a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.bus.kv_events import (
    KvEvents,
    KvSnapshot,
    encode_kv_events,
    encode_kv_snapshot,
    snapshot_parts,
)
from shared.bus.subjects import kv_events_subject, kv_snapshot_subject


@dataclass
class KvAnnouncer:
    nc: NATS
    model_name: str
    worker_id: str
    block_size: int
    log: Any
    epoch: int = field(default_factory=time.time_ns)
    seq: int = 0
    hashes: set[bytes] = field(default_factory=set)
    _outgoing: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    _sub: Any = None
    _task: asyncio.Task | None = None

    async def start(self) -> None:
        subject = kv_snapshot_subject(self.model_name, self.worker_id)
        self._sub = await self.nc.subscribe(subject, cb=self._on_snapshot_request)
        self._task = asyncio.create_task(self._publish_loop(), name="kv-announcer")

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def on_step(self, stored: list[bytes], evicted: list[bytes]) -> None:
        """One step's net changes (on the loop, in step order)."""
        if not stored and not evicted:
            return
        self.hashes.difference_update(evicted)
        self.hashes.update(stored)
        self.seq += 1
        ev = KvEvents(self.worker_id, self.epoch, self.seq, stored, evicted, self.block_size)
        self._outgoing.put_nowait(encode_kv_events(ev))

    async def _publish_loop(self) -> None:
        subject = kv_events_subject(self.model_name, self.worker_id)
        while True:
            data = await self._outgoing.get()
            try:
                await self.nc.publish(subject, data)
            except Exception as e:  # readers see the seq gap and ask for a snapshot
                self.log.warning("kv_event_publish_failed", error=f"{type(e).__name__}: {e}")

    def snapshot(self) -> KvSnapshot:
        hashes = list(self.hashes)
        return KvSnapshot(self.worker_id, self.epoch, self.seq, hashes, self.block_size)

    async def _on_snapshot_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        # Every part is built from this one state before any await: they agree on seq.
        parts = [encode_kv_snapshot(p) for p in snapshot_parts(self.snapshot())]
        try:
            for data in parts:
                await self.nc.publish(msg.reply, data)
        except Exception as e:
            self.log.warning("kv_snapshot_reply_failed", error=f"{type(e).__name__}: {e}")
