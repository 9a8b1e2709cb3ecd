"""Graceful drain of an API replica: SIGTERM -> 503 for new requests, open streams finish.

uvicorn's own shutdown closes the listening socket at once, so a load balancer that has
not noticed yet sends clients into refused connections. Instead the first SIGTERM only
marks the replica as draining: /ready turns 503 (routing moves away), new API requests
get a 503 in OpenAI's error format with Retry-After (clients retry on another replica),
and requests already in flight, streams included, run to the end. When none is left, or
the drain timeout passes, the normal uvicorn shutdown follows. A second signal stops at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import signal
import time
from dataclasses import dataclass, field
from types import FrameType

import structlog
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from services.api.errors import error_response, service_unavailable

log = structlog.get_logger("jetserve.api.drain")

EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
RETRY_AFTER_S = 1


@dataclass
class DrainState:
    draining: bool = False
    in_flight: int = 0  # API requests (not probes) still being answered, streams included
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while in_flight == 0

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class DrainMiddleware:
    """Counts requests in flight and turns new ones away while draining."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            error = service_unavailable("this API replica is shutting down; retry the request")
            response = error_response(error, scope.get("path", ""))
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            await response(scope, receive, send)
            return
        self.state.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.leave()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, state: DrainState, timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and
        # the process would end "killed by SIGTERM" instead of exiting 0 after a drain.
        if self.state.draining or self._loop is None:
            # A second signal ends the drain now; a second Ctrl-C also skips the wait for
            # open connections, as plain uvicorn does.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.state.draining = True
        # A fresh context: the signal may land while a request's log context (its job_id)
        # is current, and the drain's log lines belong to no request.
        self._loop.call_soon_threadsafe(self._start_drain, context=contextvars.Context())

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        started = time.monotonic()
        log.info("api_draining", in_flight=self.state.in_flight, timeout_s=self.timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.idle.wait(), self.timeout_s)
        log.info(
            "api_drained",
            in_flight=self.state.in_flight,
            drain_s=round(time.monotonic() - started, 3),
        )
        self.should_exit = True
