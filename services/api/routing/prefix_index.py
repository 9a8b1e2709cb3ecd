"""Which worker holds which KV block: the API replica's view, built from workers' events.

Pure state, no NATS (the listener in kv_listener.py feeds it): per worker the set of
block hashes it announced, the (epoch, seq) of the last event applied, and whether a gap
was seen. Events apply only in seq order; one that skips ahead marks the worker stale and
is kept aside, and a snapshot (every hash, as of some seq) resets the set, after which
the kept events beyond it apply. A new epoch (the worker process restarted under the
same id) starts the worker over. Applying any mix of events, in any order, with any
missing, followed by a snapshot, leaves exactly the worker's true set (the property
tests/unit/services/api/routing/test_prefix_index.py checks with hypothesis).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shared.bus.kv_events import KvEvents, KvSnapshot

MAX_KEPT_EVENTS = 4096  # events kept aside per stale worker; beyond, only a snapshot helps


@dataclass
class WorkerBlocks:
    epoch: int = -1
    seq: int = 0  # last event applied (or the snapshot's)
    hashes: set[bytes] = field(default_factory=set)
    block_size: int = 0
    stale: bool = False  # a gap was seen: a snapshot is needed
    kept: dict[int, KvEvents] = field(default_factory=dict)  # events beyond the gap


@dataclass
class PrefixIndex:
    workers: dict[str, WorkerBlocks] = field(default_factory=dict)
    owners: dict[bytes, set[str]] = field(default_factory=dict)  # hash -> workers holding it

    # -- changes ----------------------------------------------------------------------
    def apply_events(self, ev: KvEvents) -> bool:
        """Fold one event message in; True when the worker now needs a snapshot."""
        w = self._worker(ev.worker_id, ev.epoch)
        if w is None:
            return False  # from an older process of this worker id
        if ev.block_size:
            w.block_size = ev.block_size
        if ev.seq <= w.seq:
            return w.stale  # a duplicate, or already covered by a snapshot
        if w.stale or ev.seq != w.seq + 1:
            if len(w.kept) < MAX_KEPT_EVENTS:
                w.kept[ev.seq] = ev
            self._apply_kept(ev.worker_id, w)  # reordered, not lost: the gap may close
            w.stale = bool(w.kept) or len(w.kept) >= MAX_KEPT_EVENTS
            return w.stale
        self._apply(ev.worker_id, w, ev)
        return False

    def apply_snapshot(self, snap: KvSnapshot) -> bool:
        """Reset the worker to the snapshot, then apply kept events after it; True when a
        gap remains (another snapshot is needed)."""
        w = self._worker(snap.worker_id, snap.epoch)
        if w is None:
            return False
        if snap.seq < w.seq:
            return w.stale  # older than what is applied already: it cannot help
        self._set_hashes(snap.worker_id, w, set(snap.hashes))
        if snap.block_size:
            w.block_size = snap.block_size
        w.seq = snap.seq
        w.kept = {s: e for s, e in w.kept.items() if s > snap.seq}
        self._apply_kept(snap.worker_id, w)
        w.stale = bool(w.kept)
        return w.stale

    def check_head(self, worker_id: str, epoch: int, seq: int) -> bool:
        """The worker says (heartbeat) its last event is (epoch, seq): True when this view
        is behind it, i.e. the end of a burst was lost (or a restart not yet seen)."""
        w = self.workers.get(worker_id)
        if w is None:
            return seq > 0 or epoch > 0
        if epoch > w.epoch or (epoch == w.epoch and seq > w.seq):
            return True
        return w.stale

    def drop_worker(self, worker_id: str) -> None:
        """The worker left the registry: it holds nothing anyone can use."""
        w = self.workers.pop(worker_id, None)
        if w is not None:
            self._set_hashes(worker_id, w, set())

    # -- reads ------------------------------------------------------------------------
    def matched_blocks(self, worker_id: str, hashes: Sequence[bytes]) -> int:
        """How many leading hashes of the prompt's chain the worker holds."""
        w = self.workers.get(worker_id)
        if w is None:
            return 0
        n = 0
        for h in hashes:
            if h not in w.hashes:
                break
            n += 1
        return n

    def holds(self, worker_id: str, block_hash: bytes) -> bool:
        w = self.workers.get(worker_id)
        return w is not None and block_hash in w.hashes

    def hashes_of(self, worker_id: str) -> set[bytes]:
        w = self.workers.get(worker_id)
        return set(w.hashes) if w is not None else set()

    def block_size_of(self, worker_id: str) -> int:
        w = self.workers.get(worker_id)
        return w.block_size if w is not None else 0

    def num_blocks(self) -> int:
        return len(self.owners)

    # -- internals --------------------------------------------------------------------
    def _worker(self, worker_id: str, epoch: int) -> WorkerBlocks | None:
        w = self.workers.get(worker_id)
        if w is None:
            w = self.workers[worker_id] = WorkerBlocks(epoch=epoch)
        elif epoch < w.epoch:
            return None
        elif epoch > w.epoch:  # a new process under the same id: nothing carries over
            self._set_hashes(worker_id, w, set())
            w.epoch, w.seq, w.stale, w.kept = epoch, 0, False, {}
        return w

    def _apply_kept(self, worker_id: str, w: WorkerBlocks) -> None:
        while w.seq + 1 in w.kept:
            self._apply(worker_id, w, w.kept.pop(w.seq + 1))

    def _apply(self, worker_id: str, w: WorkerBlocks, ev: KvEvents) -> None:
        self._remove(worker_id, w, ev.evicted)
        self._add(worker_id, w, ev.stored)
        w.seq = ev.seq

    def _add(self, worker_id: str, w: WorkerBlocks, hashes: Iterable[bytes]) -> None:
        for h in hashes:
            if h not in w.hashes:
                w.hashes.add(h)
                self.owners.setdefault(h, set()).add(worker_id)

    def _remove(self, worker_id: str, w: WorkerBlocks, hashes: Iterable[bytes]) -> None:
        for h in hashes:
            if h in w.hashes:
                w.hashes.discard(h)
                holders = self.owners.get(h)
                if holders is not None:
                    holders.discard(worker_id)
                    if not holders:
                        del self.owners[h]

    def _set_hashes(self, worker_id: str, w: WorkerBlocks, new: set[bytes]) -> None:
        self._remove(worker_id, w, w.hashes - new)
        self._add(worker_id, w, new - w.hashes)
