"""One way to retry an async operation: a policy (how long, how often, on which errors)
and `retry`, which calls the operation until it succeeds or the policy gives up.

Every retry loop of the services uses it, each with its own named policy next to the
code it protects (NATS connect at start-up, a Delta append while NATS restarts, a lost
compare-and-set on a rate-limit bucket), so how hard each place tries is read in one
line instead of reverse-engineered from a hand-written loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `attempts` calls and/or until `deadline_s` after the first (None: no such
    bound; at least one is required). Between calls the delay grows from `base_delay_s`
    by `multiplier` up to `max_delay_s`; with `jitter` each delay is drawn uniformly from
    [0, delay], so contending clients spread out. Errors not in `retry_on` propagate."""

    attempts: int | None = None
    deadline_s: float | None = None
    base_delay_s: float = 0.1
    max_delay_s: float = 1.0
    multiplier: float = 2.0
    jitter: bool = False
    retry_on: tuple[type[Exception], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts is None and self.deadline_s is None:
            raise ValueError("a retry policy needs attempts or a deadline")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be >= 1")

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        """The pause after the `failures`-th failed call (1-based)."""
        delay = min(self.base_delay_s * self.multiplier ** (failures - 1), self.max_delay_s)
        return (rng or random).uniform(0.0, delay) if self.jitter else delay


async def retry(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    on_retry: Callable[[int, Exception], None] | None = None,
    *,
    give_up: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """`await operation()` until it returns; the last error is raised once the policy
    gives up, or as soon as `give_up()` says the result is no longer wanted (a stream
    closed while NATS was away). `on_retry(failures, error)` is called before each pause."""
    started = clock()
    failures = 0
    while True:
        try:
            return await operation()
        except policy.retry_on as e:
            failures += 1
            if policy.attempts is not None and failures >= policy.attempts:
                raise
            if policy.deadline_s is not None and clock() - started >= policy.deadline_s:
                raise
            if give_up is not None and give_up():
                raise
            if on_retry is not None:
                on_retry(failures, e)
            await asyncio.sleep(policy.delay_s(failures, rng))
