"""The API's FastAPI app: NATS connection, registry watch and metrics for its lifetime.

`create_app(settings)` builds a fresh app with its own Prometheus registry, so tests can
run several; the lifespan connects to NATS, makes sure the streams exist (the API may
start before any worker), and starts watching the worker registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from services.api.drain import DrainMiddleware, DrainState
from services.api.embeddings.openai_route import router as embeddings_router
from services.api.errors import APIError, bad_request, error_response
from services.api.gateway.admission import Gateway, GatewayMiddleware
from services.api.gateway.edge_limits import add_cors
from services.api.jobs.client import JobClient
from services.api.jobs.routes import router as jobs_router
from services.api.metrics import QueuePoller, RequestCounter
from services.api.model_registry import ModelRegistry
from services.api.ollama.catalog import router as ollama_catalog_router
from services.api.ollama.embed import router as ollama_embed_router
from services.api.ollama.pull import router as ollama_pull_router
from services.api.ollama.routes import router as ollama_router
from services.api.openai.routes import router
from services.api.openapi_doc import install_openapi
from services.api.routing.kv_listener import KvListener
from services.api.routing.prefix_index import PrefixIndex
from services.api.routing.router import Router
from services.api.state import ApiState
from shared.bus.jetstream import ensure_streams, job_records_bucket
from shared.bus.nats_connect import connect_nats
from shared.gc_tuning import tune_gc
from shared.metrics import api_metrics, new_registry
from shared.settings import ApiSettings, GatewaySettings

log = structlog.get_logger("jetserve.api")


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in the dialect of its route (services/api/errors.py)."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc, request.url.path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        error = APIError(exc.status_code, str(exc.detail), code=code)
        return error_response(error, request.url.path)

    async def validation(request: Request, exc: Exception) -> Response:
        return error_response(bad_request(f"invalid request: {exc}"), request.url.path)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", error=str(exc))
        error = APIError(500, "internal server error", code="internal_error")
        return error_response(error, request.url.path)

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
        nc = await connect_nats(
            settings.nats_url, "jetserve-api", settings.nats_connect_timeout_s, identity=settings
        )
        js = nc.jetstream()
        await ensure_streams(js, settings)
        registry = ModelRegistry(js, stale_after_s=settings.worker_ttl_s)
        await registry.start()
        await gateway.start(js, registry, settings.stream_replicas)
        poller = QueuePoller(js, registry, metrics)
        poller.start()
        kv_listener, job_router = None, None
        if settings.routing == "prefix":
            index = PrefixIndex()
            kv_listener = KvListener(nc, index, registry, metrics)
            await kv_listener.start()
            job_router = Router(
                index, registry, metrics, settings.routing_load_tokens, settings.routing_cold
            )
        jobs = JobClient(nc, js, reattach_grace_s=settings.reattach_grace_s, router=job_router)
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
        tune_gc()
        log.info("api_started", nats_url=settings.nats_url, models=registry.models())
        try:
            yield
        finally:
            await poller.stop()
            if kv_listener is not None:
                await kv_listener.stop()
            await gateway.stop()
            await registry.stop()
            await jobs.drain()
            app.state.api.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
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
    app.include_router(ollama_router)
    app.include_router(ollama_catalog_router)
    app.include_router(ollama_embed_router)
    app.include_router(ollama_pull_router)
    app.include_router(embeddings_router)
    return app
