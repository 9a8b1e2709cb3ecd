"""What the worker needs of its engine, wherever the engine runs.

EngineThread (a thread of the worker) and EngineProcess (a child process) both give
this; intake, outbox and lifecycle use nothing else, so either can be chosen at start.
"""

from __future__ import annotations

from typing import Protocol

from engine_worker.engine_core.messages import AddRequest


class EngineHandle(Protocol):
    def start(self) -> None: ...

    def add(self, request: AddRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def stop(self) -> None:
        """Nothing is applied after this; the engine's loop ends."""
        ...

    def join(self, timeout: float | None = None) -> bool:
        """True once the engine's loop has ended (blocking: call it off the event loop)."""
        ...

    @property
    def alive(self) -> bool: ...
