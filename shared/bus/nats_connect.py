"""How every jetserve process connects to NATS: bounded, readable, as its own identity.

nats-py retries a refused first connection forever when reconnects are allowed, and its
default error callback logs a full traceback every half second. A service started
before its nats-server should wait for it, but not forever: after `timeout_s` it stops
with one line that says where it looked and what to do.

The identity (`identity=settings`): user and password (from the environment or a secret
file), a reply-inbox prefix of its own (the only inbox its permissions let it read,
shared/bus/nats_auth.py), and TLS verified against the CA given, with a client certificate
when one is configured.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS

from shared.bus.nats_auth import inbox_prefix
from shared.settings import BusSettings

log = structlog.get_logger("jetserve.nats")
CLI_CONNECT_TIMEOUT_S = 5.0  # one-shot commands (keys, dead, models) fail fast


class NatsUnreachable(RuntimeError):
    """No NATS server answered at the URL within the start-up deadline."""


def unreachable_message(url: str, timeout_s: float) -> str:
    return (
        f"cannot reach NATS at {url} after {timeout_s:g}s (or it refused this process's "
        "identity: JETSERVE_NATS_USER, JETSERVE_NATS_PASSWORD_FILE): start one "
        "(`nats-server -js`, or `jetserve up`, which runs its own) or point --nats-url / "
        "JETSERVE_NATS_URL at it"
    )


async def quiet(_: Exception) -> None:
    """An error callback for one-shot commands: the failure is reported once, at the end."""


def password(settings: BusSettings) -> str | None:
    if settings.nats_password:
        return settings.nats_password
    if settings.nats_password_file:
        return Path(settings.nats_password_file).read_text().strip()
    return None


def tls_context(settings: BusSettings) -> ssl.SSLContext | None:
    if not settings.nats_tls_ca and not settings.nats_url.startswith("tls://"):
        return None
    ctx = ssl.create_default_context(cafile=settings.nats_tls_ca)
    if settings.nats_tls_cert:
        ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
    return ctx


def connect_options(settings: BusSettings | None) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` that carry this process's identity."""
    options: dict[str, Any] = {}
    if settings is None:
        return options
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = password(settings) or ""
        options["inbox_prefix"] = inbox_prefix(settings.nats_user)
    ctx = tls_context(settings)
    if ctx is not None:
        options["tls"] = ctx
    return options


async def connect(settings: BusSettings, url: str | None = None, **kwargs: Any) -> NATS:
    """A plain connect as this process's identity (tests, tools)."""
    return await nats.connect(url or settings.nats_url, **connect_options(settings), **kwargs)


async def connect_nats(
    url: str,
    name: str,
    timeout_s: float,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
    identity: BusSettings | None = None,
    **callbacks: Any,
) -> NATS:
    """Connect as `identity`, retrying until `timeout_s`; once connected, reconnect forever."""

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
                **connect_options(identity),
                **callbacks,
            ),
            timeout_s,
        )
    except TimeoutError:
        raise NatsUnreachable(unreachable_message(url, timeout_s)) from None


async def wait_for_nats(url: str, timeout_s: float, identity: BusSettings | None = None) -> None:
    """Raise NatsUnreachable unless a NATS server answers at `url` within `timeout_s`
    (checked before a web server starts, whose start-up failures come as tracebacks)."""
    nc = await connect_nats(url, "jetserve-probe", timeout_s, identity=identity)
    await nc.close()
