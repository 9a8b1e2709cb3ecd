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
("cold") goes to the shared queue, where the first free worker takes it: with nothing
to gain from a placement, work stealing balances best. Workers that do not read a
routed subject (older versions) are never chosen. Pure logic over the index and the
registry: no NATS here.
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


@dataclass(frozen=True)
class RouteDecision:
    subject: str
    decision: str  # routed | cold | no_worker | off
    worker_id: str | None = None
    cached_tokens: int = 0  # predicted prefix-cache hit on the chosen worker
    prompt_tokens: int = 0


@dataclass
class Router:
    index: PrefixIndex
    registry: ModelRegistry
    metrics: ApiMetrics | None = None
    load_tokens: float = 64.0
    # Jobs this replica routed and has not seen finish: worker -> {job id: route time}.
    _inflight: dict[str, dict[str, float]] = field(default_factory=dict)
    _worker_of: dict[str, str] = field(default_factory=dict)  # job id -> worker

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
        first_block = b""
        for status in candidates:
            bs = status.block_size or self.index.block_size_of(status.worker_id)
            cached = 0
            if bs > 0:
                hashes = hashes_by_size.get(bs)
                if hashes is None:
                    hashes = full_block_hashes(prompt_token_ids, bs, reusable_blocks(n, bs))
                    hashes_by_size[bs] = hashes
                    first_block = first_block or (hashes[0] if hashes else b"")
                cached = self.index.matched_blocks(status.worker_id, hashes) * bs
            cost = (n - cached) + self._load(status)
            key = (cost, -_rendezvous(first_block, status.worker_id), status.worker_id)
            if best is None or key < best:
                best, best_status, best_cached = key, status, cached
        assert best_status is not None
        if best_cached == 0:
            return RouteDecision(shared, "cold", prompt_tokens=n)
        self._note(best_status.worker_id, job_id)
        return RouteDecision(
            best_status.routed_subject, "routed", best_status.worker_id, best_cached, n
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

    def _note(self, worker_id: str, job_id: str) -> None:
        now = time.time()
        jobs = self._inflight.setdefault(worker_id, {})
        key = job_id or f"anon-{now}"
        jobs[key] = now
        self._worker_of[key] = worker_id
        if len(jobs) > 64 and next(iter(jobs.values())) < now - RECENT_HORIZON_S:
            # Jobs never followed here (POST /v1/jobs): their heartbeat counts them long
            # since; forget them.
            for old in [j for j, t in jobs.items() if t < now - RECENT_HORIZON_S]:
                jobs.pop(old, None)
                self._worker_of.pop(old, None)


def _rendezvous(key: bytes, worker_id: str) -> int:
    """Highest-random-weight hashing: a stable, spread-out preference per prompt."""
    digest = hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
