"""shared/periodic.py: polls on a schedule, survives a failing poll, stops promptly."""

from __future__ import annotations

import asyncio
import time

from shared.periodic import Periodic


async def test_polls_repeatedly_and_survives_a_failing_poll() -> None:
    calls: list[float] = []
    four = asyncio.Event()

    async def poll() -> None:
        calls.append(time.monotonic())
        if len(calls) == 4:
            four.set()
        if len(calls) == 2:
            raise ConnectionError("NATS restarting")

    periodic = Periodic("test", poll, interval_s=0.02)
    periodic.start()
    await asyncio.wait_for(four.wait(), 5)  # the failure at the 2nd poll did not end it
    await periodic.stop()
    n = len(calls)
    await asyncio.sleep(0.06)
    assert len(calls) == n  # nothing after stop


async def test_first_now_false_waits_one_interval() -> None:
    calls: list[int] = []

    async def poll() -> None:
        calls.append(1)

    periodic = Periodic("test", poll, interval_s=0.3, first_now=False)
    periodic.start()
    await asyncio.sleep(0.1)
    assert calls == []
    await periodic.stop()
    assert calls == []


async def test_stop_returns_even_if_the_poll_swallows_the_cancel() -> None:
    """Python 3.11 can lose a cancel inside asyncio.wait_for: the loop must end anyway."""
    started = asyncio.Event()

    async def poll() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # swallowed, as asyncio.wait_for may do

    periodic = Periodic("test", poll, interval_s=10)
    periodic.start()
    await started.wait()
    t0 = time.monotonic()
    await periodic.stop()
    assert time.monotonic() - t0 < 1.0
