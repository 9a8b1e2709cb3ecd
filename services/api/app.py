"""The API's FastAPI app: NATS connection, registry watch and metrics for its lifetime.

`create_app(settings)` builds a fresh app with its own Prometheus registry, so tests can
run several; the lifespan connects to NATS, makes sure the streams exist (the API may
start before any worker), and starts watching the worker registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import nats
import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from services.api.api_metrics import QueuePoller, RequestCounter, record_generation
from services.api.drain import DrainMiddleware, DrainState
from services.api.edge_limits import add_cors
from services.api.errors import APIError, bad_request, model_not_found, service_unavailable
from services.api.gateway import Gateway, GatewayMiddleware
from services.api.gateway_settings import GatewaySettings
from services.api.generation import Generation
from services.api.job_builder import PreparedRequest
from services.api.job_client import JobClient
from services.api.jobs_api import router as jobs_router
from services.api.model_registry import ModelRegistry, ServedModel
from services.api.openapi_doc import install_openapi
from services.api.routes import router
from shared.jetstream import ensure_streams, job_records_bucket
from shared.metrics import ApiMetrics, api_metrics, new_registry
from shared.settings import ApiSettings

log = structlog.get_logger("jetserve.api")

NATS_CONNECT_ATTEMPTS = 30


@dataclass
class ApiState:
    """Everything a request handler needs; one per app."""

    settings: ApiSettings
    nc: NATS
    js: JetStreamContext
    jobs: JobClient
    registry: ModelRegistry
    metrics: ApiMetrics
    prom: CollectorRegistry
    job_records: Any = None  # KV bucket of the jobs API
    drain: DrainState = field(default_factory=DrainState)
    gateway: Gateway | None = None  # auth, limits, usage (services/api/gateway.py)

    async def resolve(self, name: str, require_live: bool = True) -> ServedModel:
        try:
            model = await self.registry.get(name, require_live=require_live)
        except Exception as e:
            log.error("tokenizer_load_failed", model=name, error=str(e))
            raise service_unavailable(f"could not load the tokenizer of '{name}': {e}") from e
        if model is None:
            raise model_not_found(name)
        return model

    async def start_generation(
        self, model: ServedModel, prepared: PreparedRequest, user: str | None
    ) -> Generation:
        tags = {"user": user} if user else {}
        if self.gateway is not None:
            # Key caps, tokens/min, priority class, cost tags: 4xx/429 before queueing.
            admission = await self.gateway.admit(model, prepared, user)
            prepared, tags = admission.prepared, admission.tags
        gen = Generation(self.jobs, model, prepared, tags=tags)
        if self.gateway is not None:
            self.gateway.attach(gen, admission)
        structlog.contextvars.bind_contextvars(job_id=gen.request_id)
        try:
            await gen.start()
        except Exception as e:
            if self.gateway is not None:
                self.gateway.release(gen)
            log.error("job_publish_failed", error=str(e))
            raise service_unavailable(f"could not queue the request: {e}") from e
        return gen

    def finish(self, gen: Generation) -> None:
        """Cancel what still runs and record metrics; idempotent."""
        gen.close()
        if not gen.recorded:
            gen.recorded = True
            record_generation(self.metrics, gen)
            if self.gateway is not None:
                self.gateway.on_finish(gen)
            t = gen.timing
            log.info(
                "request_finished",
                job_id=gen.request_id,
                model=gen.model.name,
                prompt_tokens=gen.usage.prompt_tokens,
                completion_tokens=gen.usage.completion_tokens,
                cached_tokens=gen.usage.cached_tokens,
                finish_reasons=[c.finish_reason for c in gen.choices.values()],
                ttft_s=None if t.first_token is None else round(t.first_token - t.start, 4),
                e2e_s=round((t.end or t.start) - t.start, 4),
            )


async def connect_nats(url: str) -> NATS:
    """Retry the first connection for a while: in compose the API may start before NATS."""
    last: Exception | None = None
    for attempt in range(NATS_CONNECT_ATTEMPTS):
        try:
            return await nats.connect(
                url,
                name="jetserve-api",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
            )
        except Exception as e:
            last = e
            log.warning("nats_connect_retry", url=url, attempt=attempt + 1, error=str(e))
            await asyncio.sleep(1.0)
    raise RuntimeError(f"could not connect to NATS at {url}: {last}")


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    async def validation(_: Request, exc: Exception) -> Response:
        return bad_request(f"invalid request: {exc}").response()

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", error=str(exc))
        return APIError(500, "internal server error", code="internal_error").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, unexpected)


def create_app(
    settings: ApiSettings | None = None, gateway_settings: GatewaySettings | None = None
) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    prom = new_registry()
    metrics = api_metrics(prom)
    gateway = Gateway.create(gateway_settings or GatewaySettings.from_env(), prom)
    drain = DrainState()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await connect_nats(settings.nats_url)
        js = nc.jetstream()
        await ensure_streams(js, settings)
        registry = ModelRegistry(js, stale_after_s=settings.worker_ttl_s)
        await registry.start()
        await gateway.start(js, registry, settings.stream_replicas)
        poller = QueuePoller(js, registry, metrics)
        poller.start()
        jobs = JobClient(nc, js, reattach_grace_s=settings.reattach_grace_s)
        await jobs.start()
        records = await job_records_bucket(js, settings)
        app.state.api = ApiState(
            settings,
            nc,
            js,
            jobs,
            registry,
            metrics,
            prom,
            job_records=records,
            drain=drain,
            gateway=gateway,
        )
        log.info("api_started", nats_url=settings.nats_url, models=registry.models())
        try:
            yield
        finally:
            await poller.stop()
            await gateway.stop()
            await registry.stop()
            await jobs.drain()
            try:
                await nc.drain()
            except Exception as e:
                log.warning("nats_drain_failed", error=str(e))

    app = FastAPI(
        title="jetserve",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.drain = drain  # the server's SIGTERM handler flips it (services/api/drain.py)
    app.add_middleware(DrainMiddleware, state=drain)
    app.add_middleware(GatewayMiddleware, gateway=gateway)  # inside the counter: 401/429 count
    app.add_middleware(RequestCounter, metrics=metrics)
    add_cors(app, gateway.settings.cors_origins)  # outermost: preflights need no key
    _install_error_handlers(app)
    app.include_router(router)
    install_openapi(app, gateway.settings.public_paths)
    app.include_router(jobs_router)
    return app
