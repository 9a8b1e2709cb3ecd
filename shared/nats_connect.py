"""The first connection to NATS, bounded, with errors a person can read.

nats-py retries a refused first connection forever when reconnects are allowed, and its
default error callback logs a full traceback every half second. A service started
before its nats-server should wait for it, but not forever: after `timeout_s` it stops
with one line that says where it looked and what to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS

log = structlog.get_logger("jetserve.nats")
CLI_CONNECT_TIMEOUT_S = 5.0  # one-shot commands (keys, dead, models) fail fast


class NatsUnreachable(RuntimeError):
    """No NATS server answered at the URL within the start-up deadline."""


def unreachable_message(url: str, timeout_s: float) -> str:
    return (
        f"cannot reach NATS at {url} after {timeout_s:g}s: start one (`nats-server -js`, or "
        "`jetserve up`, which runs its own) or point --nats-url / JETSERVE_NATS_URL at it"
    )


async def quiet(_: Exception) -> None:
    """An error callback for one-shot commands: the failure is reported once, at the end."""


async def connect_nats(
    url: str,
    name: str,
    timeout_s: float,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
    **callbacks: Any,
) -> NATS:
    """Connect, retrying until `timeout_s`; once connected, reconnect forever."""

    async def one_line(e: Exception) -> None:
        log.warning("nats_error", url=url, error=str(e) or type(e).__name__)

    try:
        return await asyncio.wait_for(
            nats.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                error_cb=error_cb or one_line,
                **callbacks,
            ),
            timeout_s,
        )
    except TimeoutError:
        raise NatsUnreachable(unreachable_message(url, timeout_s)) from None


async def wait_for_nats(url: str, timeout_s: float) -> None:
    """Raise NatsUnreachable unless a NATS server answers at `url` within `timeout_s`
    (checked before a web server starts, whose start-up failures come as tracebacks)."""
    nc = await connect_nats(url, "jetserve-probe", timeout_s)
    await nc.close()
