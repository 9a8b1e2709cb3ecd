"""Job ids cancelled before this worker pulled them, remembered for a while.

A cancel is a core NATS message: it reaches every worker at once, even those that do
not hold the job yet. Each worker remembers the id (bounded, with a TTL) so that if it
pulls that job later it closes it without running it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CancelMemory:
    ttl_s: float = 600.0
    max_entries: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _ids: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def add(self, job_id: str) -> None:
        self._ids[job_id] = self.clock()
        self._ids.move_to_end(job_id)
        self._expire()

    def __contains__(self, job_id: str) -> bool:
        self._expire()
        return job_id in self._ids

    def discard(self, job_id: str) -> None:
        self._ids.pop(job_id, None)

    def __len__(self) -> int:
        self._expire()
        return len(self._ids)

    def _expire(self) -> None:
        """Oldest first: drop expired entries, then any beyond the bound."""
        cutoff = self.clock() - self.ttl_s
        while self._ids:
            oldest_id, added = next(iter(self._ids.items()))
            if added >= cutoff and len(self._ids) <= self.max_entries:
                break
            del self._ids[oldest_id]
