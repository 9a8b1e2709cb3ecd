"""Server-sent events framing for OpenAI streams.

Each event carries `id: <job_id>:<seq>` (the delta's sequence number in LLM_EVENTS) so a
client that reconnects with Last-Event-ID can later be resumed from the persisted deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

SSE_MEDIA_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_id(job_id: str, seq: int) -> str:
    return f"{job_id}:{seq}"


def parse_event_id(value: str) -> tuple[str, int]:
    """Inverse of `event_id`; raises ValueError on anything else."""
    job_id, sep, seq = value.rpartition(":")
    if not sep or not job_id:
        raise ValueError(f"not an event id: {value!r}")
    return job_id, int(seq)


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


# JSON leaves these unescaped inside strings, but many line readers (Python's
# str.splitlines among them) break lines on them: escaped, an event stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def format_event(payload: dict[str, Any] | str, event_id_: str | None = None) -> bytes:
    """One `data:` event: a dict, or JSON already serialized on one line; optional id line."""
    data = payload if isinstance(payload, str) else dumps(payload)
    if not data.isascii():
        data = data.translate(_LINE_BREAKS)
    head = f"id: {event_id_}\n" if event_id_ else ""
    return f"{head}data: {data}\n\n".encode()


class EventStreamResponse(Response):
    """Streams SSE bytes and notices a client that goes away while nothing is being sent.

    A watcher task waits for `http.disconnect` (uvicorn reports it as soon as the socket
    closes), cancels the producer, and `on_close` runs in every case, so an abandoned
    stream always cancels its job on the worker.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[], None],
        media_type: str = SSE_MEDIA_TYPE,  # Ollama's routes stream NDJSON the same way
    ) -> None:
        super().__init__(status_code=200, headers=SSE_HEADERS, media_type=media_type)
        # Response sets content-length for its (empty) body; a stream must not have one.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        producer = asyncio.current_task()
        assert producer is not None
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, producer))
        try:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (asyncio.CancelledError, OSError):
            # The client left; nothing more can be sent. Swallow only our own cancel.
            if not watcher.done() or watcher.cancelled():
                raise
            producer.uncancel()
        finally:
            watcher.cancel()
            await _aclose(self.events)
            self.on_close()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


async def _aclose(events: AsyncIterator[bytes]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
