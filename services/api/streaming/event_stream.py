"""How both generation endpoints consume a Generation: streamed, the SSE body (prelude, a
chunk per event, usage, [DONE]); not streamed, every event collected for one response."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from services.api.errors import internal_error
from services.api.jobs.client import JobFailed
from services.api.streaming.generation import ChoiceEvent, Generation
from services.api.streaming.sse import DONE, format_event


async def sse_body(
    gen: Generation,
    render: Callable[[ChoiceEvent], str],
    prelude: list[str] | None = None,
    usage_chunk: Callable[[], str] | None = None,
) -> AsyncIterator[bytes]:
    """Events that arrived together go out in one write; a failed job ends with an error event."""
    try:
        for data in prelude or []:
            yield format_event(data)
        async for batch in gen.events():
            yield b"".join(format_event(render(ev), ev.event_id) for ev in batch)
        if usage_chunk is not None:
            yield format_event(usage_chunk())
    except JobFailed as e:
        yield format_event(internal_error(f"generation failed: {e}").body())
    yield DONE


async def collect_events(
    gen: Generation, take: Callable[[ChoiceEvent], None]
) -> dict[int, str | None]:
    """Every event through `take`; the finish reason of each choice. A failed job is a
    500 in the OpenAI error format."""
    finish: dict[int, str | None] = dict.fromkeys(gen.choices)
    try:
        async for batch in gen.events():
            for ev in batch:
                take(ev)
                if ev.finish_reason is not None:
                    finish[ev.index] = ev.finish_reason
    except JobFailed as e:
        raise internal_error(f"generation failed: {e}") from e
    return finish
