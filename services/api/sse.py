"""Server-sent events framing for OpenAI streams.

Each event carries `id: <job_id>:<seq>` (the delta's sequence number in LLM_EVENTS) so a
client that reconnects with Last-Event-ID can later be resumed from the persisted deltas.
"""

from __future__ import annotations

import json
from typing import Any

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


def format_event(payload: dict[str, Any], event_id_: str | None = None) -> bytes:
    """One `data:` event (JSON on one line), with an optional id line."""
    head = f"id: {event_id_}\n" if event_id_ else ""
    return f"{head}data: {dumps(payload)}\n\n".encode()
