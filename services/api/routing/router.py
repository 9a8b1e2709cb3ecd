"""Choose the worker a job goes to: the one where its prompt's prefix is cached, unless
that worker is busier than the prefill it saves.

Cost of a live worker = prompt tokens it does not hold (uncached prefill) + a load term
in the same unit, tokens:
`load_tokens x (running + 4 x waiting) + 8 x load_tokens x kv_usage`, where running and
waiting come from the worker's heartbeat, raised by what this replica knows better: the
jobs it routed there and has not seen finish (newer than the heartbeat: not in it yet;
more than the worker's capacity: waiting, in its routed subject or its engine). The
heartbeat lags by up to a second, so a burst would otherwise all go to one worker. The lowest cost wins; equal costs go to the worker that
rendezvous hashing of the prompt's first block names, so every replica with the same
view (index and registry) picks the same worker. A prompt no worker holds any block of
("cold") goes, with `cold="queue"`, to the shared queue, where the first free worker
takes it. With `cold="place"` it goes to the least loaded worker instead (ties: the
rendezvous order of its first block), and the router counts the blocks it sends a
worker as held there ("pending") until the job finishes or PENDING_TTL_S passes: the
worker announces a prompt's blocks only after prefilling it, and in a burst (the first
turns of many chats on a few system prompts) the prompts that arrive meanwhile would
otherwise land anywhere and each worker would prefill the system prompt again. Workers
that do not read a routed subject (older versions) are never chosen. Pure logic over
the index and the registry: no NATS here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.api.model_registry import ModelRegistry
from services.api.routing.prefix_index import PrefixIndex
from shared.bus.subjects import jobs_subject
from shared.bus.worker_registry import WorkerStatus
from shared.kv_blocks import full_block_hashes, reusable_blocks
from shared.metrics import ApiMetrics

WAITING_WEIGHT = 4.0  # a waiting sequence delays a new one more than a running one
KV_WEIGHT = 8.0  # a full cache means evictions (of someone's prefix) and preemptions
RECENT_HORIZON_S = 30.0
PENDING_TTL_S = 30.0  # a job never followed here (POST /v1/jobs): its blocks stop counting
COLD_MODES = ("queue", "place")


@dataclass(frozen=True)
class RouteDecision:
    subject: str
    decision: str  # routed | placed | cold | no_worker | off
    worker_id: str | None = None
    cached_tokens: int = 0  # predicted prefix-cache hit on the chosen worker
    prompt_tokens: int = 0


@dataclass
class Router:
    index: PrefixIndex
    registry: ModelRegistry
    metrics: ApiMetrics | None = None
    load_tokens: float = 64.0
    cold: str = "queue"  # queue | place: where a prompt no worker holds goes
    # Jobs this replica routed and has not seen finish: worker -> {job id: route time}.
    _inflight: dict[str, dict[str, float]] = field(default_factory=dict)
    _worker_of: dict[str, str] = field(default_factory=dict)  # job id -> worker
    # cold="place": blocks sent to a worker and maybe not announced yet, counted per job.
    _pending: dict[str, dict[bytes, int]] = field(default_factory=dict)  # worker -> hash -> n
    _pending_jobs: dict[str, tuple[str, list[bytes], float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cold not in COLD_MODES:
            raise ValueError(f"cold must be one of {COLD_MODES}, not {self.cold!r}")

    def choose(
        self, model: str, prompt_token_ids: Sequence[int], job_id: str = ""
    ) -> RouteDecision:
        n = len(prompt_token_ids)
        shared = jobs_subject(model)
        candidates = [
            e.status for e in self.registry.live_workers(model) if e.status.routed_subject
        ]
        if not candidates:
            return RouteDecision(shared, "no_worker", prompt_tokens=n)
        hashes_by_size: dict[int, list[bytes]] = {}
        best: tuple[float, int, str] | None = None
        best_status: WorkerStatus | None = None
        best_cached = 0
        best_hashes: list[bytes] = []
        first_block = b""
        place = self.cold == "place"
        for status in candidates:
            bs = status.block_size or self.index.block_size_of(status.worker_id)
            cached = 0
            if bs > 0:
                hashes = hashes_by_size.get(bs)
                if hashes is None:
                    hashes = full_block_hashes(prompt_token_ids, bs, reusable_blocks(n, bs))
                    hashes_by_size[bs] = hashes
                    first_block = first_block or (hashes[0] if hashes else b"")
                cached = self._matched(status.worker_id, hashes, place) * bs
            cost = (n - cached) + self._load(status)
            key = (cost, -_rendezvous(first_block, status.worker_id), status.worker_id)
            if best is None or key < best:
                best, best_status, best_cached = key, status, cached
                best_hashes = hashes_by_size.get(bs, []) if bs > 0 else []
        assert best_status is not None
        if best_cached == 0 and not place:
            return RouteDecision(shared, "cold", prompt_tokens=n)
        self._note(best_status.worker_id, job_id, best_hashes if place else [])
        return RouteDecision(
            best_status.routed_subject,
            "routed" if best_cached else "placed",
            best_status.worker_id,
            best_cached,
            n,
        )

    def route(self, model: str, prompt_token_ids: Sequence[int], job_id: str = "") -> RouteDecision:
        """`choose`, counted in /metrics."""
        decision = self.choose(model, prompt_token_ids, job_id)
        if self.metrics is not None:
            self.metrics.routing_decisions.labels(model, decision.decision).inc()
            self.metrics.routing_prompt_tokens.labels(model).inc(decision.prompt_tokens)
            self.metrics.routing_cached_tokens.labels(model).inc(decision.cached_tokens)
        return decision

    def finished(self, job_id: str) -> None:
        """The job's stream closed here: it no longer adds to its worker's load."""
        worker = self._worker_of.pop(job_id, None)
        if worker is not None:
            self._inflight.get(worker, {}).pop(job_id, None)
        self._release(job_id)

    def pending_blocks(self, worker_id: str) -> int:
        """Blocks counted as held by the worker only because this replica sent them there."""
        return len(self._pending.get(worker_id) or {})

    def _matched(self, worker_id: str, hashes: Sequence[bytes], with_pending: bool) -> int:
        """Leading blocks of the chain the worker holds (index), or is about to (pending)."""
        held = self.index.matched_blocks(worker_id, hashes)
        pending = self._pending.get(worker_id) if with_pending else None
        if not pending:
            return held
        while held < len(hashes) and (
            hashes[held] in pending or self.index.holds(worker_id, hashes[held])
        ):
            held += 1
        return held

    def _load(self, s: WorkerStatus) -> float:
        jobs = self._inflight.get(s.worker_id) or {}
        since = sum(1 for t in jobs.values() if t > s.updated_at)
        # Jobs routed here and unfinished beyond what the worker can run are waiting, in
        # its routed subject (which no heartbeat counts) or in its engine.
        beyond = max(len(jobs) - max(s.capacity, 1), 0)
        running = max(s.num_running + since, min(len(jobs), s.capacity))
        waiting = max(s.num_waiting, beyond)
        return self.load_tokens * (
            running + WAITING_WEIGHT * waiting + KV_WEIGHT * s.kv_cache_usage
        )

    def _note(self, worker_id: str, job_id: str, hashes: Sequence[bytes] = ()) -> None:
        now = time.time()
        jobs = self._inflight.setdefault(worker_id, {})
        key = job_id or f"anon-{now}"
        jobs[key] = now
        self._worker_of[key] = worker_id
        if hashes:
            self._hold(key, worker_id, list(hashes), now)
        if len(jobs) > 64 and next(iter(jobs.values())) < now - RECENT_HORIZON_S:
            # Jobs never followed here (POST /v1/jobs): their heartbeat counts them long
            # since; forget them.
            for old in [j for j, t in jobs.items() if t < now - RECENT_HORIZON_S]:
                jobs.pop(old, None)
                self._worker_of.pop(old, None)

    def _hold(self, key: str, worker_id: str, hashes: list[bytes], now: float) -> None:
        self._release(key)
        self._pending_jobs[key] = (worker_id, hashes, now)
        counts = self._pending.setdefault(worker_id, {})
        for h in hashes:
            counts[h] = counts.get(h, 0) + 1
        oldest = next(iter(self._pending_jobs))  # insertion order: the oldest first
        if self._pending_jobs[oldest][2] < now - PENDING_TTL_S:
            for old in [j for j, v in self._pending_jobs.items() if v[2] < now - PENDING_TTL_S]:
                self._release(old)

    def _release(self, key: str) -> None:
        entry = self._pending_jobs.pop(key, None)
        if entry is None:
            return
        worker_id, hashes, _ = entry
        counts = self._pending.get(worker_id, {})
        for h in hashes:
            left = counts.get(h, 0) - 1
            if left > 0:
                counts[h] = left
            else:
                counts.pop(h, None)


def _rendezvous(key: bytes, worker_id: str) -> int:
    """Highest-random-weight hashing: a stable, spread-out preference per prompt."""
    digest = hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
