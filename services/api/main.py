"""`jetserve api`: run the OpenAI-compatible API under uvicorn.

Deliberately free of torch: the API image carries only tokenizers, FastAPI and NATS.
"""

from __future__ import annotations

import argparse
import asyncio

import structlog
import uvicorn

from shared.bus.nats_connect import NatsUnreachable, wait_for_nats
from shared.logging import configure_logging
from shared.settings import ApiSettings, GatewaySettings, add_flags

SETTINGS = (ApiSettings, GatewaySettings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, *SETTINGS)


def run(args: argparse.Namespace) -> int:
    settings = ApiSettings.from_args(args)
    gateway = GatewaySettings.from_args(args)
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        asyncio.run(wait_for_nats(settings.nats_url, settings.nats_connect_timeout_s, settings))
    except NatsUnreachable as e:
        structlog.get_logger("jetserve.api").error("api_start_failed", error=str(e))
        return 1
    from services.api.app import create_app
    from services.api.drain import DrainingServer

    app = create_app(settings, gateway)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        # The drain already gave open requests --drain-timeout (help: "this long"); after
        # it, uvicorn's own shutdown only flushes what is written and closes.
        timeout_graceful_shutdown=0.5,
    )
    # SIGTERM drains first (503 for new requests, open streams finish), then shuts down.
    DrainingServer(config, app.state.drain, settings.drain_timeout_s).run()
    return 0
