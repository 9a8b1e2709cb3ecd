"""Limits applied at the HTTP edge, before any handler runs: body size, body read time,
time to the first response byte, and CORS.

The body is read here in full (every endpoint takes a small JSON body anyway), bounded
in size and time, so a slow or huge upload ties up nothing beyond this function, and
the gateway can look at the body (the model name) before choosing local or fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import APIError, error_response

EXPOSED_HEADERS = ["Retry-After", "X-Request-Id"]
ALLOWED_HEADERS = [
    "Authorization",
    "Content-Type",
    "X-Feature",
    "Last-Event-ID",
    "OpenAI-Organization",
]


class ClientGone(Exception):
    """The client disconnected while sending its body."""


def too_large(limit: int) -> APIError:
    return APIError(
        413, f"Request body too large; the limit is {limit} bytes.", code="request_too_large"
    )


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(receive: Receive, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or 413 past `max_bytes`, or 408 if it takes over `timeout_s`."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise APIError(
            408, f"The request body did not arrive within {timeout_s:g} s.", code="timeout"
        ) from None


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then the real channel (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class ResponseStarted:
    """Tracks whether the response has begun, so a timeout can still answer 504."""

    def __init__(self, send: Send) -> None:
        self.started = False
        self.on_start: Callable[[], None] | None = None
        self._send = send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and not self.started:
            self.started = True
            if self.on_start is not None:
                self.on_start()
        await self._send(message)


async def call_with_deadline(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, timeout_s: float
) -> None:
    """Run the app; if no response byte is sent within `timeout_s`, cancel it and send 504.

    Once the response starts (a stream's headers) the deadline is lifted: a long stream is
    fine, a request stuck before answering is not. Cancelling the handler cancels its job.
    """
    tracked = ResponseStarted(send)
    deadline = asyncio.timeout(timeout_s)
    tracked.on_start = lambda: deadline.reschedule(None)
    try:
        async with deadline:
            await app(scope, receive, tracked)
        return
    except TimeoutError:
        if tracked.started or not deadline.expired():
            raise
    error = APIError(504, f"The request did not complete within {timeout_s:g} s.", code="timeout")
    await error_response(error, scope.get("path", ""))(scope, receive, send)


def add_cors(app: FastAPI, origins: Sequence[str]) -> None:
    """Outermost, so preflight OPTIONS requests (which carry no key) are answered here."""
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
