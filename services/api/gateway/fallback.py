"""Fallback upstream: another OpenAI-compatible server takes requests this one should not.

Two triggers, checked before a request is tokenized or queued: no live worker serves the
requested model, or the model's queue is backed up (its head-of-line job, the oldest not
yet pulled by any worker, has waited longer than a threshold). The queue wait is polled
from JetStream once a second: the consumer's last delivered stream sequence gives the
next pending message, whose stored time is when it was queued. While requests divert,
nothing new joins the queue, it drains, the wait drops below the threshold, and requests
come back here: recovery needs no extra state.

The proxy streams the upstream response through unchanged (SSE included), with the
upstream's own key; a client that disconnects closes the upstream request too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import httpx
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from starlette.types import Receive, Scope, Send

from services.api.errors import APIError
from services.api.gateway.metrics import GatewayMetrics
from services.api.model_registry import ModelRegistry
from shared.bus.subjects import JOBS_STREAM, consumer_name, jobs_subject
from shared.periodic import Periodic

log = structlog.get_logger("jetserve.api.fallback")

FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "x-feature", "last-event-id")
DROPPED_RESPONSE_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date"}
)
MAX_USAGE_SCAN_BYTES = 4 * 1024 * 1024


async def head_of_line_wait(js: JetStreamContext, model: str, now: float | None = None) -> float:
    """Seconds the oldest job of `model` not yet delivered to a worker has waited (0 if none)."""
    try:
        info = await js.consumer_info(JOBS_STREAM, consumer_name(model))
    except NotFoundError:
        return 0.0
    if not info.num_pending:
        return 0.0
    try:
        msg = await js.get_msg(
            JOBS_STREAM,
            seq=int(info.delivered.stream_seq or 0) + 1,
            subject=jobs_subject(model),
            next=True,
        )
    except NotFoundError:
        return 0.0
    if msg.time is None:
        return 0.0
    return max(0.0, (now or time.time()) - msg.time.timestamp())


@dataclass
class QueueWaitMonitor:
    """Polls the head-of-line wait of every served model into `waits` and a gauge."""

    js: JetStreamContext
    registry: ModelRegistry
    metrics: GatewayMetrics
    interval_s: float = 1.0
    waits: dict[str, float] = field(default_factory=dict)
    _periodic: Periodic | None = None

    def start(self) -> None:
        self._periodic = Periodic("queue-wait-monitor", self.poll_once, self.interval_s)
        self._periodic.start()

    async def stop(self) -> None:
        if self._periodic is not None:
            await self._periodic.stop()

    async def poll_once(self) -> None:
        for model in set(self.registry.models()) | set(self.waits):
            wait = await head_of_line_wait(self.js, model)
            self.waits[model] = wait
            self.metrics.queue_head_wait.labels(model).set(wait)


def fallback_reason(
    model: str, registry: ModelRegistry, waits: dict[str, float], max_wait_s: float
) -> str | None:
    """Why `model`'s request should go to the fallback, or None to serve it here."""
    if not registry.live_workers(model):
        return "no_worker"
    if max_wait_s > 0 and waits.get(model, 0.0) > max_wait_s:
        return "queue_wait"
    return None


def requested_model(body: bytes) -> str | None:
    """The `model` of a JSON body, or None (the handler will then reject the body)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def upstream_url(base_url: str, path: str) -> str:
    """`base_url` is what an OpenAI SDK takes (…/v1); `path` is ours (/v1/…)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    return base + path


def usage_from_body(content_type: str, body: bytes) -> dict | None:
    """The `usage` object of a JSON response or of the last SSE chunk that has one."""
    texts: list[bytes]
    if "text/event-stream" in content_type:
        texts = [
            line[5:].strip()
            for line in body.splitlines()
            if line.startswith(b"data:") and b'"usage"' in line
        ]
    else:
        texts = [body]
    usage = None
    for text in texts:
        with contextlib.suppress(ValueError):
            obj = json.loads(text)
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                usage = obj["usage"]
    return usage


@dataclass
class ProxyResult:
    status: int
    usage: dict | None


@dataclass
class FallbackProxy:
    base_url: str
    api_key: str | None
    timeout_s: float
    client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def _headers(self, scope: Scope) -> dict[str, str]:
        headers = {}
        for name, value in scope.get("headers", []):
            key = name.decode("latin-1").lower()
            if key in FORWARDED_REQUEST_HEADERS:
                headers[key] = value.decode("latin-1")
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    async def forward(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> ProxyResult:
        """Send the request upstream and stream the answer back; 502 if unreachable."""
        assert self.client is not None, "start() first"
        request = self.client.build_request(
            scope["method"], upstream_url(self.base_url, scope["path"]),
            content=body, headers=self._headers(scope),
        )  # fmt: skip
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            log.warning("fallback_unreachable", url=str(request.url), error=repr(e))
            err = APIError(
                502, f"The fallback upstream is unreachable: {type(e).__name__}", code="bad_gateway"
            )
            await err.response()(scope, receive, send)
            return ProxyResult(502, None)
        content_type = response.headers.get("content-type", "")
        scanned = bytearray()
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.items()
                        if k.lower() not in DROPPED_RESPONSE_HEADERS
                    ],
                }
            )
            gone = asyncio.create_task(_client_gone(receive))
            try:
                async for chunk in _until(response.aiter_raw(), gone):
                    if len(scanned) < MAX_USAGE_SCAN_BYTES:
                        scanned += chunk
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                gone.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()  # closing mid-stream makes the upstream cancel its job
        return ProxyResult(response.status_code, usage_from_body(content_type, bytes(scanned)))


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until(chunks, gone: asyncio.Task):
    """Yield from an async iterator until it ends or `gone` completes."""
    iterator = chunks.__aiter__()
    while True:
        nxt = asyncio.ensure_future(iterator.__anext__())
        done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()
            await asyncio.gather(nxt, return_exceptions=True)
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return
