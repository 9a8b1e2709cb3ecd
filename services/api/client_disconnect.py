"""Run a non-streaming handler's work, but stop it if the HTTP client goes away.

Starlette does not cancel a plain (non-streaming) handler when its client disconnects;
without this a long generation would keep a worker busy for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's code; the client never sees it, logs and metrics do


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


async def collected_response(
    request: Request,
    work: Awaitable[T],
    render: Callable[[T], Response],
    on_close: Callable[[], None],
) -> Response:
    """A generation's non-streamed answer: 499 when the client left first; `on_close`
    (which cancels what still runs and records metrics) runs in every case."""
    try:
        result = await unless_disconnected(request, work)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        on_close()
    return render(result)
