"""shared/retry.py: how many calls, which pauses, which errors are retried."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.retry import RetryPolicy, retry

FAST = dict(base_delay_s=0.001, max_delay_s=0.002)


class Flaky:
    """Fails `failures` times with `error`, then returns "ok"."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionError("down")
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


async def test_retries_until_it_succeeds_and_reports_each_failure() -> None:
    op, seen = Flaky(3), []
    result = await retry(op, RetryPolicy(attempts=5, **FAST), lambda n, e: seen.append(n))
    assert result == "ok" and op.calls == 4 and seen == [1, 2, 3]


async def test_raises_the_last_error_once_attempts_run_out() -> None:
    op = Flaky(10)
    with pytest.raises(ConnectionError):
        await retry(op, RetryPolicy(attempts=3, **FAST))
    assert op.calls == 3


async def test_errors_outside_retry_on_are_not_retried() -> None:
    op = Flaky(1, ValueError("bad input"))
    with pytest.raises(ValueError):
        await retry(op, RetryPolicy(attempts=5, retry_on=(ConnectionError,), **FAST))
    assert op.calls == 1


async def test_a_deadline_bounds_the_time_spent_not_the_calls() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # each look at the clock is one second later
        return now[0]

    op = Flaky(100)
    with pytest.raises(ConnectionError):
        await retry(op, RetryPolicy(deadline_s=5.0, **FAST), clock=clock)
    # Start at 1 s; failure k is seen at 1 + k s: the 5th is the first at or past 5 s.
    assert op.calls == 5


def test_a_policy_needs_a_bound() -> None:
    with pytest.raises(ValueError):
        RetryPolicy()
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_delays_double_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=10, base_delay_s=0.1, max_delay_s=0.5)
    assert [policy.delay_s(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    constant = RetryPolicy(attempts=10, base_delay_s=1.0, multiplier=1.0)
    assert {constant.delay_s(n) for n in range(1, 20)} == {1.0}


@given(failures=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_jittered_delays_stay_within_the_window(failures: int, seed: int) -> None:
    policy = RetryPolicy(attempts=50, base_delay_s=0.001, max_delay_s=0.064, jitter=True)
    window = min(0.001 * 2 ** (failures - 1), 0.064)
    assert 0.0 <= policy.delay_s(failures, random.Random(seed)) <= window


async def test_gives_up_when_the_result_is_no_longer_wanted() -> None:
    op, wanted = Flaky(100), [True]

    def on_retry(failures: int, _: Exception) -> None:
        if failures == 3:
            wanted[0] = False  # e.g. the stream waiting for it closed

    with pytest.raises(ConnectionError):
        await retry(
            op,
            RetryPolicy(deadline_s=float("inf"), **FAST),
            on_retry,
            give_up=lambda: not wanted[0],
        )
    assert op.calls == 4  # the call after the last pause failed too, then it stopped
