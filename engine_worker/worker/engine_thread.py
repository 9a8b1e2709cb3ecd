"""The engine core in a thread of the worker process (`--no-engine-process`).

The asyncio side sends commands through a thread-safe inbox; the core's loop
(engine_worker/engine_core/core.py) applies them between steps and each step's result
is posted back onto the event loop with `call_soon_threadsafe`. The loop therefore
never blocks on the engine, and the engine never waits for NATS; but the engine's
Python work and the worker's share one GIL. `EngineProcess`
(engine_worker/engine_core/client.py) has the same interface with the core in a child
process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.engine_core.core import EngineCore, admit_slots
from engine_worker.engine_core.messages import (
    AbortRequest,
    AddRequest,
    Command,
    StepResult,
    Stop,
)

__all__ = ["AddRequest", "EngineThread", "StepResult", "admit_slots"]


class QueueCommands:
    """The core's command source in a thread: a queue the event loop puts into."""

    def __init__(self, inbox: queue.SimpleQueue[Command]) -> None:
        self._inbox = inbox

    def get(self, wait_s: float) -> list[Command]:
        commands: list[Command] = []
        if wait_s > 0:
            try:
                commands.append(self._inbox.get(timeout=wait_s))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands


class EngineThread:
    """Runs `engine` in a daemon thread; `on_result` is called on `loop` after each step."""

    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        on_result: Callable[[StepResult], None],
        idle_wait_s: float = 0.5,
    ) -> None:
        self.engine = engine
        self._loop = loop
        self._on_result = on_result
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._core = EngineCore(engine, QueueCommands(self._inbox), self._post, idle_wait_s)
        self._thread = threading.Thread(target=self._core.run, name="engine", daemon=True)

    # -- called from the event loop ------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def add(self, request: AddRequest) -> None:
        self._inbox.put(request)

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    def stop(self) -> None:
        self._inbox.put(Stop())

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread --------------------------------------------------
    def _post(self, result: StepResult) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._on_result, result)
        except RuntimeError:
            return False  # the loop is closed: the worker is gone, nobody to tell
        return True
