"""Fire-and-forget coroutines that an object owns: token refunds, cancels, hand-offs.

asyncio keeps only a weak reference to a task, so a task nobody holds can be collected
before it runs; and a request whose handler is cancelled must not take its cleanup with
it. The owner keeps its tasks here until they finish, a failure is logged once on the
owner's logger (never an unretrieved-exception warning), and `wait` lets the owner's stop
or drain send what is still owed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackgroundTasks:
    """The owner's running background tasks; `failed` names the warning a failure logs."""

    log: Any
    failed: str
    _tasks: set[asyncio.Task] = field(default_factory=set, repr=False)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning(self.failed, error=str(task.exception()))

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self) -> None:
        """Until every task spawned so far has finished (failures already logged)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
