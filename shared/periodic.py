"""A background task that runs one coroutine every few seconds and survives its errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)


@dataclass
class Periodic:
    """Calls `poll` every `interval_s`; a failing poll (a NATS hiccup) is logged, not fatal."""

    name: str
    poll: Callable[[], Awaitable[None]]
    interval_s: float = 1.0
    _task: asyncio.Task | None = field(default=None, repr=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("periodic_poll_failed", task=self.name, error=str(e))
            await asyncio.sleep(self.interval_s)
