"""The API's Prometheus side: per-request latencies and tokens, request counts by
endpoint and status, and the queue depth / live worker gauges polled from NATS."""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from nats.js import JetStreamContext
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.model_registry import ModelRegistry
from services.api.streaming.generation import Generation
from shared.bus.jetstream import queue_depth
from shared.metrics import ApiMetrics
from shared.periodic import Periodic

log = structlog.get_logger("jetserve.api.metrics")

ENDPOINTS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"}
)


def record_generation(metrics: ApiMetrics, gen: Generation) -> None:
    """Observe a finished (or abandoned) request once."""
    model = gen.model.name
    t = gen.timing
    end = t.end or t.start
    metrics.e2e_request_latency.labels(model).observe(end - t.start)
    if t.first_token is not None:
        metrics.time_to_first_token.labels(model).observe(t.first_token - t.start)
        if t.max_tokens_in_a_choice > 1:
            tpot = (end - t.first_token) / (t.max_tokens_in_a_choice - 1)
            metrics.time_per_output_token.labels(model).observe(tpot)
    metrics.prompt_tokens.labels(model).inc(gen.usage.prompt_tokens)
    metrics.generation_tokens.labels(model).inc(gen.usage.completion_tokens)
    reasons = [c.finish_reason or "abort" for c in gen.choices.values()]
    for reason in reasons:
        metrics.request_success.labels(model, reason).inc()


class RequestCounter:
    """Pure ASGI middleware (no body buffering, streaming-safe) counting responses."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.api_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


@dataclass
class QueuePoller:
    """Refreshes queue depth (consumer num_pending) and live workers per model."""

    js: JetStreamContext
    registry: ModelRegistry
    metrics: ApiMetrics
    interval_s: float = 1.0
    known: set[str] = field(default_factory=set)
    _periodic: Periodic | None = None

    def start(self) -> None:
        self._periodic = Periodic("queue-poller", self.poll_once, self.interval_s)
        self._periodic.start()

    async def stop(self) -> None:
        if self._periodic is not None:
            await self._periodic.stop()

    async def poll_once(self) -> None:
        self.known |= set(self.registry.models())
        for model in sorted(self.known):
            self.metrics.workers.labels(model).set(len(self.registry.live_workers(model)))
            self.metrics.queue_depth.labels(model).set(await queue_depth(self.js, model))
