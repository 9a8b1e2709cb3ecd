"""Per-key rate limits shared by every API replica, and per-replica concurrency limits.

Requests/min and tokens/min are token buckets (capacity = the per-minute limit, refilled
continuously at limit/60 per second) whose state lives in the NATS KV bucket
`llm_rate_limits`: one entry per key and kind, `{"level", "t"}`. A take reads the entry,
refills it to now, and writes it back only if the revision is still the one it read
(optimistic concurrency: KV create / update with last revision); on a conflict it
retries. So N replicas enforce one limit, without a lock service. Entries expire after a
few idle minutes; a missing entry is a full bucket, which is what it would have refilled
to anyway. Clocks of replicas are assumed NTP-close; a skew of δ seconds shifts at most
δ·limit/60 tokens.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue
from starlette.responses import JSONResponse

from services.api.errors import APIError
from shared.bus.jetstream import open_kv_bucket
from shared.bus.subjects import RATE_LIMITS_BUCKET
from shared.retry import RetryPolicy, retry

RATE_BUCKET = RATE_LIMITS_BUCKET
ENTRY_TTL_S = 300.0  # > 60 s: an entry idle this long has refilled completely
# After a lost compare-and-set, wait a random slice of a doubling window (1 ms, 2 ms, ...
# 64 ms): without it a burst of N takers on one key retries in lock-step and the unlucky
# ones run out of attempts (a spurious 429) while the bucket still has tokens.
CONFLICT_RETRY = RetryPolicy(
    attempts=20,
    base_delay_s=0.001,
    max_delay_s=0.064,
    jitter=True,
    retry_on=(KeyWrongLastSequenceError,),
)


class RateLimited(APIError):
    """429 with Retry-After (whole seconds, at least 1), and which limit it was."""

    def __init__(self, message: str, retry_after_s: float, limit: str) -> None:
        super().__init__(429, message, code="rate_limit_exceeded")
        self.retry_after_s = retry_after_s
        self.limit = limit

    def response(self) -> JSONResponse:
        resp = super().response()
        resp.headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return resp


async def rate_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    return await open_kv_bucket(js, RATE_BUCKET, history=1, ttl=ENTRY_TTL_S, replicas=replicas)


@dataclass(frozen=True)
class Bucket:
    """A token bucket of `per_minute` capacity that refills fully in one minute."""

    per_minute: int

    @property
    def refill_per_s(self) -> float:
        return self.per_minute / 60.0

    def level_at(self, level: float, since: float, now: float) -> float:
        return min(float(self.per_minute), level + max(0.0, now - since) * self.refill_per_s)


@dataclass
class SharedBuckets:
    """Token buckets in the KV bucket; `take` is safe against concurrent replicas."""

    kv: KeyValue
    conflicts: int = 0  # CAS retries, for tests and debugging

    async def take(self, name: str, cost: float, bucket: Bucket) -> float:
        """Spend `cost` if available: 0.0. Otherwise nothing is spent and the seconds until
        it would be available are returned."""
        return await self._change(name, -cost, bucket)

    async def give_back(self, name: str, amount: float, bucket: Bucket) -> None:
        """Return unused reservation (capped at capacity)."""
        if amount > 0:
            await self._change(name, amount, bucket)

    async def _change(self, name: str, delta: float, bucket: Bucket) -> float:
        """Apply `delta` with a compare-and-set; a lost race re-reads and tries again."""

        async def attempt() -> float:
            try:
                return await self._change_once(name, delta, bucket)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                raise

        try:
            return await retry(attempt, CONFLICT_RETRY)
        except KeyWrongLastSequenceError:
            raise RateLimited(
                "rate limit state is contended; retry shortly", 1.0, "contention"
            ) from None

    async def _change_once(self, name: str, delta: float, bucket: Bucket) -> float:
        now = time.time()
        revision = None
        level = float(bucket.per_minute)
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            entry = None
        if entry is not None:
            revision = entry.revision
            try:
                state = json.loads(entry.value or b"{}")
                level = bucket.level_at(float(state["level"]), float(state["t"]), now)
            except (ValueError, KeyError, TypeError):
                pass  # a corrupt entry counts as full; the write below replaces it
        new_level = min(float(bucket.per_minute), level + delta)
        if new_level < 0:
            return -new_level / bucket.refill_per_s
        value = json.dumps({"level": new_level, "t": now}).encode()
        if revision is None:
            await self.kv.create(name, value)
        else:
            await self.kv.update(name, value, last=revision)
        return 0.0


def bucket_name(key_id: str, kind: str) -> str:
    return f"{key_id}.{kind}"


@dataclass
class ConcurrencyLimiter:
    """Open requests per key on this replica (a crashed replica leaks nothing)."""

    open: dict[str, int] = field(default_factory=dict)

    def acquire(self, key_id: str, limit: int | None) -> bool:
        current = self.open.get(key_id, 0)
        if limit is not None and current >= limit:
            return False
        self.open[key_id] = current + 1
        return True

    def release(self, key_id: str) -> None:
        left = self.open.get(key_id, 0) - 1
        if left > 0:
            self.open[key_id] = left
        else:
            self.open.pop(key_id, None)


@dataclass
class StreamBudget:
    """Open job streams on this replica, per key and in total.

    Every job an API replica follows (a stream, a non-streaming request, a re-attach, a
    jobs-API event stream) holds server-side state for as long as it is followed: a
    JetStream consumer or a subscription, whichever the token path uses. Both are finite
    on the server and shared by every tenant, so they are budgeted here: a key that asks
    for more than its share gets a 429 while the others still get served, instead of
    everyone getting a 503 once the server's own limit is hit. Keep
    `replicas * total` below what the NATS server allows.
    """

    per_key: int
    total: int
    open: dict[str, int] = field(default_factory=dict)
    in_use: int = 0

    def acquire(self, key_id: str, count: int, per_key: bool = True) -> str | None:
        """Take `count` streams for `key_id`: None, or which budget is exhausted.
        `per_key` False: only the total applies (auth off: one anonymous tenant)."""
        if count <= 0:
            return None
        current = self.open.get(key_id, 0)
        if per_key and current + count > self.per_key:
            return "open_streams_per_key"
        if self.in_use + count > self.total:
            return "open_streams"
        self.open[key_id] = current + count
        self.in_use += count
        return None

    def release(self, key_id: str, count: int) -> None:
        if count <= 0:
            return
        left = self.open.get(key_id, 0) - count
        self.in_use = max(0, self.in_use - count)
        if left > 0:
            self.open[key_id] = left
        else:
            self.open.pop(key_id, None)
