"""What every request handler reads: the API's connections, registry, metrics and gateway.

It lives apart from `app.py` so route modules import it without importing the app that
includes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from services.api.drain import DrainState
from services.api.errors import echo, model_not_found, service_unavailable
from services.api.gateway.admission import Admission, Gateway, current_caller
from services.api.gateway.rate_limit import RateLimited
from services.api.jobs.builder import (
    PreparedRequest,
    check_request_size,
    prepare_chat,
    prepare_completion,
)
from services.api.jobs.client import JobClient
from services.api.jobs.records import JobRecord, put_record
from services.api.metrics import record_generation
from services.api.model_registry import ModelRegistry, ServedModel
from services.api.openai.schemas import ChatCompletionRequest, CompletionRequest
from services.api.streaming.generation import Generation
from shared.bus.jetstream import is_queue_full
from shared.metrics import ApiMetrics
from shared.settings import ApiSettings

log = structlog.get_logger("jetserve.api")
T = TypeVar("T")
QUEUE_FULL_RETRY_S = 5.0

# Tokenizing and chat templates run here, never on the event loop: a long prompt then
# delays only the requests queued behind it in this pool, not every stream of the replica
# (the tokenizer releases the GIL while it encodes).
TOKENIZER_THREADS = 4
# A completion whose prompt is token ids, or text this short, is prepared on the event
# loop: its tokenizer work (tens of microseconds) costs less than the hop to a thread,
# which on a busy machine waits for a core (measured: ~1-3 ms of TTFT at load 18).
INLINE_PROMPT_CHARS = 1024


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
    gateway: Gateway | None = None  # auth, limits, usage (services/api/gateway/admission.py)
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(TOKENIZER_THREADS, "tokenize")
    )

    async def prepare(
        self, req: CompletionRequest | ChatCompletionRequest, model: ServedModel
    ) -> PreparedRequest:
        """Validate and tokenize off the event loop; too-large prompts are refused first,
        here, without waiting for a thread."""
        check_request_size(req, model)
        if isinstance(req, CompletionRequest) and cheap_prompt(req.prompt):
            return prepare_completion(req, model)
        build = prepare_chat if isinstance(req, ChatCompletionRequest) else prepare_completion
        return await self.off_loop(build, req, model)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run tokenizer or template work in the tokenizer pool."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    async def resolve(self, name: str, require_live: bool = True) -> ServedModel:
        try:
            model = await self.registry.get(name, require_live=require_live)
        except Exception as e:
            log.error("tokenizer_load_failed", model=name, error=str(e))
            raise service_unavailable(f"could not load the tokenizer of '{echo(name)}': {e}") from e
        if model is None:
            raise model_not_found(name)
        return model

    async def start_generation(
        self,
        model: ServedModel,
        prepared: PreparedRequest,
        user: str | None,
        endpoint: str = "completions",
    ) -> Generation:
        tags = {"user": user} if user else {}
        admission: Admission | None = None
        if self.gateway is not None:
            # Key caps, open streams, tokens/min, priority class, cost tags: 4xx/429
            # before queueing.
            admission = await self.gateway.admit(model, prepared, user)
            prepared, tags = admission.prepared, admission.tags
        gen = Generation(
            self.jobs, model, prepared, tags=tags, deadline_s=self.settings.job_deadline_s
        )
        if self.gateway is not None and admission is not None:
            self.gateway.attach(gen, admission)
        structlog.contextvars.bind_contextvars(job_id=gen.request_id)
        try:
            if len(prepared.prompts) == 1:
                # A job the client can come back to (re-attach) records its owner; stored
                # while the job is published, so it costs no extra round trip.
                await asyncio.gather(self._record_owner(gen, endpoint), gen.start())
            else:
                await gen.start()  # several prompts cannot be re-attached: no record
        except Exception as e:
            gen.close()
            if self.gateway is not None:
                self.gateway.release(gen)
            if is_queue_full(e):
                raise queue_full(model.name) from e
            log.error("job_publish_failed", error=str(e))
            raise service_unavailable(f"could not queue the request: {e}") from e
        return gen

    async def _record_owner(self, gen: Generation, endpoint: str) -> None:
        record = JobRecord(
            id=gen.request_id,
            model=gen.model.name,
            endpoint=endpoint,
            created_at=time.time(),
            prompt_tokens=len(gen.prepared.prompts[0]),
            owner=current_caller().key_id,
        )
        await put_record(self.job_records, record)

    def finish(self, gen: Generation) -> None:
        """Cancel what still runs and record metrics; idempotent."""
        gen.close()
        if self.gateway is not None:
            self.gateway.on_finish(gen)  # once: it settles what admission held
        if not gen.recorded:
            gen.recorded = True
            record_generation(self.metrics, gen)
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


def cheap_prompt(prompt: Any) -> bool:
    """Token ids, or at most INLINE_PROMPT_CHARS of text in all."""
    if isinstance(prompt, str):
        return len(prompt) <= INLINE_PROMPT_CHARS
    if not isinstance(prompt, list) or not prompt:
        return True  # refused by the builder without any tokenizer work
    if isinstance(prompt[0], str):
        return sum(len(p) for p in prompt if isinstance(p, str)) <= INLINE_PROMPT_CHARS
    return True  # token ids: only checked against the vocabulary


def queue_full(model: str) -> RateLimited:
    """429 + Retry-After: the model's jobs queue is at its bound (or the queue's bytes)."""
    return RateLimited(
        f"The queue of model '{echo(model)}' is full; retry later.",
        QUEUE_FULL_RETRY_S,
        "queue_full",
    )


def api_state(request: Request) -> ApiState:
    """The app's state, set by its lifespan (services/api/app.py)."""
    return request.app.state.api
