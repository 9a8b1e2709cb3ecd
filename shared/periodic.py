"""A background task that runs one coroutine every few seconds and survives its errors.

Every periodic loop of the services uses it: the API's queue-depth and queue-wait pollers,
the worker's registry heartbeat and in-progress acks, the janitor's sweep.

Stopping cannot hang: `stop` sets a flag the loop checks and waits on between polls, then
cancels the task and waits for it with a bound. (On Python 3.11 a cancel that lands as a
NATS reply arrives can be swallowed inside `asyncio.wait_for`; a loop that relied on the
cancel alone would then run on, and a stop waiting for it would never return.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

STOP_TIMEOUT_S = 5.0


@dataclass
class Periodic:
    """Calls `poll` every `interval_s` (the first time at once, or after one interval with
    `first_now=False`); a failing poll (a NATS hiccup) is logged on `log`, not fatal."""

    name: str
    poll: Callable[[], Awaitable[Any]]
    interval_s: float = 1.0
    first_now: bool = True
    log: Any = field(default_factory=lambda: structlog.get_logger(__name__))
    _task: asyncio.Task | None = field(default=None, repr=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=STOP_TIMEOUT_S)

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.interval_s)

    async def _run(self) -> None:
        if not self.first_now:
            await self._pause()
        while not self._stopping.is_set():
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.log.warning("periodic_poll_failed", task=self.name, error=str(e))
            await self._pause()
