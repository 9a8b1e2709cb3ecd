"""The gateway in front of the OpenAI routes: who is calling, may they, and where it runs.

`GatewayMiddleware` (pure ASGI, streaming-safe) does, in order: public paths pass;
API key check (401); requests/min (429); declared body size (413); concurrent requests
(429); bounded body read (413/408); fallback routing for generation requests; then the
routes, under a deadline for the first response byte (504). The caller it found is put in
a request-scoped context variable (like structlog's bound job_id), which
`Gateway.admit` reads when the handler has tokenized the request: prompt length and
max_tokens caps, tokens/min reservation, the key's priority class, and the cost tags the
Job carries. `Gateway.on_finish` refunds the unused token reservation and meters usage.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field, replace

import structlog
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Receive, Scope, Send

from services.api.errors import APIError, bad_request, error_response
from services.api.gateway.auth import AuthError, authenticate
from services.api.gateway.edge_limits import (
    ClientGone,
    call_with_deadline,
    declared_length,
    read_body,
    replay,
    too_large,
)
from services.api.gateway.fallback import (
    FallbackProxy,
    QueueWaitMonitor,
    fallback_reason,
    requested_model,
)
from services.api.gateway.key_store import KeyStore, keys_bucket, seed_records
from services.api.gateway.keys import ApiKeyRecord, KeyRecordError, parse_keys_env, parse_keys_file
from services.api.gateway.metrics import GatewayMetrics, gateway_metrics
from services.api.gateway.rate_limit import (
    Bucket,
    ConcurrencyLimiter,
    RateLimited,
    SharedBuckets,
    StreamBudget,
    bucket_name,
    rate_bucket,
)
from services.api.gateway.usage import ANONYMOUS, UsageMeter, UsageRecord, clean_tag
from services.api.jobs.builder import PreparedRequest
from services.api.model_registry import ModelRegistry, ServedModel
from services.api.streaming.generation import Generation
from shared.background_tasks import BackgroundTasks
from shared.settings import GatewaySettings

log = structlog.get_logger("jetserve.api.gateway")

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})  # fallback-capable
# Requests that run on a worker: they count against the key's concurrent-request cap.
CONCURRENT_PATHS = GENERATION_PATHS | frozenset(
    {"/v1/embeddings", "/api/generate", "/api/chat", "/api/embed", "/api/embeddings"}
)
JOB_EVENTS_PREFIX, JOB_EVENTS_SUFFIX = "/v1/jobs/", "/events"  # a job's stream: counted too
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
PRIORITY_LIMIT = 2**31


@dataclass(frozen=True)
class Caller:
    """Who sent the current request: its key (None with auth off) and its feature tag."""

    key: ApiKeyRecord | None
    feature: str | None = None

    @property
    def key_id(self) -> str:
        return self.key.id if self.key else ANONYMOUS


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "jetserve_caller", default=None
)


def current_caller() -> Caller:
    return _caller.get() or Caller(key=None)


@dataclass
class Admission:
    """What `admit` decided for one request; `on_finish` settles it."""

    prepared: PreparedRequest
    tags: dict[str, str]
    caller: Caller
    reserved_tokens: int = 0
    streams: int = 0  # held on the StreamBudget until on_finish/release
    route: str = "local"  # local | reattach | job_events (the usage record's route)


@dataclass
class Gateway:
    settings: GatewaySettings
    metrics: GatewayMetrics
    meter: UsageMeter
    concurrency: ConcurrencyLimiter = field(default_factory=ConcurrencyLimiter)
    store: KeyStore | None = None
    buckets: SharedBuckets | None = None
    registry: ModelRegistry | None = None
    monitor: QueueWaitMonitor | None = None
    proxy: FallbackProxy | None = None
    admissions: dict[int, Admission] = field(default_factory=dict)  # by id(Generation)
    streams: StreamBudget = field(default_factory=lambda: StreamBudget(128, 512))
    tenant_prom: CollectorRegistry | None = None  # per-key series: operators only
    _background: BackgroundTasks = field(
        default_factory=lambda: BackgroundTasks(log, "token_refund_failed")
    )

    @classmethod
    def create(cls, settings: GatewaySettings, prom: CollectorRegistry) -> Gateway:
        tenants = CollectorRegistry(auto_describe=True)
        metrics = gateway_metrics(prom, tenants)
        budget = StreamBudget(settings.max_open_streams_per_key, settings.max_open_streams)
        metrics.open_streams.set_function(lambda: budget.in_use)
        return cls(
            settings=settings,
            metrics=metrics,
            meter=UsageMeter(metrics),
            streams=budget,
            tenant_prom=tenants,
        )

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, js: JetStreamContext, registry: ModelRegistry, replicas: int) -> None:
        self.registry = registry
        self.buckets = SharedBuckets(await rate_bucket(js, replicas))
        if self.settings.auth:
            kv = await keys_bucket(js, replicas)
            seeds = self._seed_records()
            if seeds:
                changed = await seed_records(kv, seeds)
                log.info("api_keys_seeded", keys=len(seeds), changed=changed)
            self.store = KeyStore(kv)
            await self.store.start()
            self.metrics.api_keys.set_function(lambda: self.store.active_keys if self.store else 0)
            if not self.store.active_keys:
                log.warning("auth_on_without_keys", hint="create one with `jetserve keys create`")
        if self.settings.fallback_url:
            self.proxy = FallbackProxy(
                self.settings.fallback_url,
                self.settings.fallback_api_key,
                self.settings.fallback_timeout_s,
            )
            await self.proxy.start()
            self.monitor = QueueWaitMonitor(
                js, registry, self.metrics, self.settings.queue_poll_interval_s
            )
            self.monitor.start()
        log.info(
            "gateway_started",
            auth=self.settings.auth,
            fallback=bool(self.settings.fallback_url),
            cors=list(self.settings.cors_origins),
        )

    def _seed_records(self) -> list[ApiKeyRecord]:
        records = []
        try:
            if self.settings.api_keys_file:
                records += parse_keys_file(self.settings.api_keys_file)
            if self.settings.api_keys:
                records += parse_keys_env(self.settings.api_keys)
        except (OSError, KeyRecordError) as e:
            raise RuntimeError(f"cannot load API keys: {e}") from e
        return records

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        if self.store is not None:
            await self.store.stop()
        await self._background.wait()
        if self.proxy is not None:
            await self.proxy.stop()

    # ---- edge: run by the middleware -----------------------------------------------------

    def authenticate(self, scope: Scope) -> Caller:
        headers = {
            k: v for k, v in scope.get("headers", []) if k in (b"authorization", b"x-feature")
        }
        feature = headers.get(b"x-feature")
        feature_tag = clean_tag(feature.decode("latin-1")) if feature else None
        if not self.settings.auth:
            return Caller(key=None, feature=feature_tag)
        if self.store is None:
            raise APIError(503, "The API is starting.", code="service_unavailable")
        auth = headers.get(b"authorization")
        try:
            key = authenticate(self.store, auth.decode("latin-1") if auth else None)
        except AuthError as e:
            self.metrics.auth_failures.labels(e.reason).inc()
            raise
        return Caller(key=key, feature=feature_tag)

    def shows_tenant_metrics(self, authorization: str | None) -> bool:
        """Per-key series go to an operator key, or to anyone with auth off."""
        if not self.settings.auth:
            return True
        if self.store is None or not authorization:
            return False
        try:
            key = authenticate(self.store, authorization)
        except AuthError:
            return False
        return key.operator

    async def check_request_rate(self, caller: Caller) -> None:
        rpm = caller.key.limits.requests_per_minute if caller.key else None
        if rpm is None or self.buckets is None:
            return
        wait = await self.buckets.take(bucket_name(caller.key_id, "req"), 1, Bucket(rpm))
        if wait > 0:
            raise self._limited(
                caller, "requests_per_minute", wait,
                f"Rate limit reached for requests per minute (limit {rpm}). "
                f"Try again in {wait:.1f} s.",
            )  # fmt: skip

    def _limited(self, caller: Caller, limit: str, wait: float, message: str) -> RateLimited:
        self.metrics.rate_limited.labels(caller.key_id, limit).inc()
        return RateLimited(message, wait, limit)

    def fallback_for(self, scope: Scope, body: bytes) -> tuple[str, str] | None:
        """(model, reason) when this generation request should go to the fallback.

        A re-attach (Last-Event-ID or ?after=) follows a job in this cluster's streams, so
        it is never diverted.
        """
        if self.proxy is None or self.registry is None or self.monitor is None:
            return None
        if is_reattach(scope):
            return None
        model = requested_model(body)
        if model is None:
            return None
        reason = fallback_reason(
            model, self.registry, self.monitor.waits, self.settings.fallback_queue_wait_s
        )
        return None if reason is None else (model, reason)

    async def serve_fallback(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, model: str, reason: str
    ) -> None:
        assert self.proxy is not None
        caller = current_caller()
        started = time.monotonic()
        result = await self.proxy.forward(scope, body, receive, send)
        if result.status < 400:
            outcome = "ok"
        elif result.status == 502:
            outcome = "unreachable"
        else:
            outcome = "client_error" if result.status < 500 else "upstream_error"
        self.metrics.fallback_requests.labels(model, reason, outcome).inc()
        log.info(
            "fallback_request",
            model=model,
            reason=reason,
            status=result.status,
            outcome=outcome,
            key_id=caller.key_id,
            duration_s=round(time.monotonic() - started, 4),
        )
        usage = result.usage or {}
        details = usage.get("prompt_tokens_details") or {}
        self.meter.record(
            UsageRecord(
                request_id="",
                model=model,
                key_id=caller.key_id,
                key_name=caller.key.name if caller.key else ANONYMOUS,
                feature=caller.feature,
                user=None,
                route="fallback",
                status=result.status,
                prompt_tokens=_int(usage.get("prompt_tokens")),
                completion_tokens=_int(usage.get("completion_tokens")),
                cached_tokens=_int(
                    details.get("cached_tokens") if isinstance(details, dict) else 0
                ),
                fallback_reason=reason,
            )
        )

    # ---- admission: run by the handler once the request is tokenized ---------------------

    def _hold_streams(self, caller: Caller, count: int) -> None:
        per_key = caller.key is not None  # auth off: one tenant, only the total applies
        if per_key and count > self.streams.per_key:  # never runs: a 400, not a 429 to retry
            raise bad_request(
                f"This request needs {count} jobs at once; this API allows {self.streams.per_key} "
                "open streams per key. Send fewer prompts or inputs per request.",
                param="prompt",
            )
        exhausted = self.streams.acquire(caller.key_id, count, per_key)
        if exhausted is None:
            return
        limit = self.streams.per_key if exhausted == "open_streams_per_key" else self.streams.total
        raise self._limited(
            caller, exhausted, 1.0,
            f"Too many open streams ({exhausted}, limit {limit}); close some or retry shortly.",
        )  # fmt: skip

    def admit_reattach(self, prepared: PreparedRequest, route: str) -> Admission:
        """A reader of an existing job (re-attach, job events): it holds one stream and is
        metered; tokens/min was reserved by the request that queued the job."""
        caller = current_caller()
        self._hold_streams(caller, 1)
        tags = {"key_id": caller.key_id}
        if caller.feature:
            tags["feature"] = caller.feature
        return Admission(prepared, tags, caller, streams=1, route=route)

    async def admit(
        self,
        model: ServedModel,
        prepared: PreparedRequest,
        user: str | None,
        hold_streams: bool = True,
    ) -> Admission:
        """Apply the caller's caps, hold its streams, reserve tokens/min, set priority and
        cost tags. `hold_streams` is False for the jobs API's submit: nobody follows it."""
        caller = current_caller()
        key = caller.key
        limits = key.limits if key else None
        prompts = prepared.prompts
        longest = max((len(p) for p in prompts), default=0)
        if not -PRIORITY_LIMIT < prepared.priority < PRIORITY_LIMIT:
            raise bad_request("priority must fit in 32 bits", param="priority")
        sampling = prepared.sampling
        if limits and limits.max_prompt_tokens and longest > limits.max_prompt_tokens:
            self.metrics.rate_limited.labels(caller.key_id, "max_prompt_tokens").inc()
            raise bad_request(
                f"The prompt has {longest} tokens; this API key allows at most "
                f"{limits.max_prompt_tokens}.",
                param="prompt",
                code="prompt_too_long",
            )
        if limits and limits.max_tokens and sampling.max_tokens > limits.max_tokens:
            if prepared.max_tokens_explicit:
                self.metrics.rate_limited.labels(caller.key_id, "max_tokens").inc()
                raise bad_request(
                    f"max_tokens is {sampling.max_tokens}; this API key allows at most "
                    f"{limits.max_tokens}.",
                    param="max_tokens",
                    code="max_tokens_exceeded",
                )
            sampling = replace(sampling, max_tokens=limits.max_tokens)
        priority = prepared.priority
        if key is not None:
            priority = max(priority, key.priority_floor)
        prepared = replace(prepared, sampling=sampling, priority=priority)
        streams = len(prompts) if hold_streams else 0
        self._hold_streams(caller, streams)
        try:
            reserved = await self._reserve_tokens(caller, prompts, sampling)
        except BaseException:
            self.streams.release(caller.key_id, streams)
            raise
        tags = {"key_id": caller.key_id}
        if caller.feature:
            tags["feature"] = caller.feature
        if user:
            tags["user"] = user[:256]
        return Admission(prepared, tags, caller, reserved_tokens=reserved, streams=streams)

    async def _reserve_tokens(self, caller: Caller, prompts: list[list[int]], sampling) -> int:
        limits = caller.key.limits if caller.key else None
        reserved = 0
        tpm = limits.tokens_per_minute if limits else None
        if tpm is not None and self.buckets is not None:
            reserved = sum(len(p) for p in prompts) + sampling.max_tokens * sampling.n * len(
                prompts
            )
            if reserved > tpm:
                raise self._limited(
                    caller, "tokens_per_minute", 60.0,
                    f"Request too large: it may use {reserved} tokens (prompt + max_tokens) "
                    f"but this API key allows {tpm} tokens per minute. Lower max_tokens.",
                )  # fmt: skip
            wait = await self.buckets.take(bucket_name(caller.key_id, "tok"), reserved, Bucket(tpm))
            if wait > 0:
                raise self._limited(
                    caller, "tokens_per_minute", wait,
                    f"Rate limit reached for tokens per minute (limit {tpm}). "
                    f"Try again in {wait:.1f} s.",
                )  # fmt: skip
        return reserved

    def attach(self, gen: Generation, admission: Admission) -> None:
        self.admissions[id(gen)] = admission

    def on_finish(self, gen: Generation, status: int = 200) -> None:
        """Settle the token reservation and meter the request; once per generation."""
        admission = self.admissions.pop(id(gen), None)
        if admission is None:
            return
        caller = admission.caller
        self.streams.release(caller.key_id, admission.streams)
        prompt_tokens = gen.usage.prompt_tokens
        completion_tokens = gen.usage.completion_tokens
        if admission.route != "local":
            # A reader of a job that was metered when it was queued: it is billed for what
            # it delivered, after the event it resumed from; the prompt was billed once.
            prompt_tokens = 0
            completion_tokens -= gen.usage.replayed_tokens
        used = prompt_tokens + completion_tokens
        self._refund(admission, admission.reserved_tokens - used)
        self.meter.record(
            UsageRecord(
                request_id=gen.request_id,
                model=gen.model.name,
                key_id=caller.key_id,
                key_name=caller.key.name if caller.key else ANONYMOUS,
                feature=caller.feature,
                user=admission.tags.get("user"),
                route=admission.route,
                status=status,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=gen.usage.cached_tokens,
                queue_time_s=gen.usage.queue_time_s,
                gpu_time_s=gen.usage.gpu_time_s,
            )
        )

    def release(self, gen: Generation) -> None:
        """The request never ran (publish failed): give the whole reservation back."""
        admission = self.admissions.pop(id(gen), None)
        if admission is not None:
            self.streams.release(admission.caller.key_id, admission.streams)
            self._refund(admission, admission.reserved_tokens)

    def _refund(self, admission: Admission, amount: int) -> None:
        key = admission.caller.key
        if amount <= 0 or key is None or self.buckets is None:
            return
        tpm = key.limits.tokens_per_minute
        if tpm is None:
            return
        coro = self.buckets.give_back(bucket_name(key.id, "tok"), amount, Bucket(tpm))
        self._background.spawn(coro)


def is_counted_path(path: str) -> bool:
    """Routes counted against max_concurrent: those that run or follow a job."""
    if path in CONCURRENT_PATHS:
        return True
    return path.startswith(JOB_EVENTS_PREFIX) and path.endswith(JOB_EVENTS_SUFFIX)


def is_reattach(scope: Scope) -> bool:
    if any(name == b"last-event-id" for name, _ in scope.get("headers", [])):
        return True
    query = scope.get("query_string", b"")
    return any(part.split(b"=", 1)[0] == b"after" for part in query.split(b"&"))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class GatewayMiddleware:
    """Auth, limits and fallback around every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gw = self.gateway
        settings = gw.settings
        path = scope.get("path", "")
        if path in settings.public_paths:
            await self.app(scope, receive, send)
            return
        try:
            caller = gw.authenticate(scope)
            await gw.check_request_rate(caller)
            length = declared_length(scope)
            if length is not None and length > settings.max_body_bytes:
                raise too_large(settings.max_body_bytes)
        except APIError as e:
            await error_response(e, path)(scope, receive, send)
            return
        counted = is_counted_path(path)
        limit = caller.key.limits.max_concurrent if caller.key else None
        if counted and not gw.concurrency.acquire(caller.key_id, limit):
            err = gw._limited(
                caller, "max_concurrent", 1.0,
                f"Too many concurrent requests for this API key (limit {limit}).",
            )  # fmt: skip
            await error_response(err, path)(scope, receive, send)
            return
        token = _caller.set(caller)
        try:
            await self._serve(scope, receive, send, path in GENERATION_PATHS)
        finally:
            _caller.reset(token)
            if counted:
                gw.concurrency.release(caller.key_id)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, generation: bool) -> None:
        gw = self.gateway
        settings = gw.settings
        if scope.get("method") in BODY_METHODS:
            try:
                body = await read_body(receive, settings.max_body_bytes, settings.body_timeout_s)
            except ClientGone:
                return
            except APIError as e:
                await error_response(e, scope.get("path", ""))(scope, receive, send)
                return
            if generation:
                target = gw.fallback_for(scope, body)
                if target is not None:
                    await gw.serve_fallback(scope, body, receive, send, *target)
                    return
            receive = replay(body, receive)
        await call_with_deadline(self.app, scope, receive, send, settings.request_timeout_s)
