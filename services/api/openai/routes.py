"""HTTP routes: the OpenAI endpoints plus /health, /ready and /metrics.

Handlers stay thin: parse the body strictly, resolve the model from the registry,
prepare the job (all 4xx checks happen before anything is published), then stream or
collect the generation.
"""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from services.api.client_disconnect import collected_response
from services.api.errors import APIError, echo
from services.api.openai.chat import chat_response, chat_stream
from services.api.openai.completions import completion_response, completion_stream
from services.api.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from services.api.request_body import parse_body
from services.api.state import api_state
from services.api.streaming.reattach import open_generation, reattach_cursor
from services.api.streaming.sse import EventStreamResponse
from shared.metrics import CONTENT_TYPE, render

log = structlog.get_logger("jetserve.api")
router = APIRouter()


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(CompletionRequest, await request.body())
    cursor = await reattach_cursor(st, request)  # a re-attach: Last-Event-ID or ?after=
    model = await st.resolve(req.model, require_live=cursor is None)
    prepared = await st.prepare(req, model)
    gen = await open_generation(st, cursor, model, prepared, req.user, bool(req.stream))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = completion_stream(gen, include_usage, req.logprobs)
        return EventStreamResponse(events, on_close=lambda: st.finish(gen))
    work = completion_response(gen, req.logprobs)
    return await collected_response(request, work, _json, lambda: st.finish(gen))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(ChatCompletionRequest, await request.body())
    cursor = await reattach_cursor(st, request)  # a re-attach: Last-Event-ID or ?after=
    model = await st.resolve(req.model, require_live=cursor is None)
    prepared = await st.prepare(req, model)
    gen = await open_generation(
        st, cursor, model, prepared, req.user, bool(req.stream), "chat.completions"
    )
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = chat_stream(gen, include_usage, top_logprobs)
        return EventStreamResponse(events, on_close=lambda: st.finish(gen))
    work = chat_response(gen, top_logprobs)
    return await collected_response(request, work, _json, lambda: st.finish(gen))


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    reg = api_state(request).registry
    cards = [ModelCard(id=m, max_model_len=reg.model_max_len(m)) for m in reg.models()]
    return _json(ModelList(data=cards))


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> Response:
    reg = api_state(request).registry
    if model not in reg.models():
        raise APIError(404, f"The model '{echo(model)}' does not exist", "model", "model_not_found")
    return _json(ModelCard(id=model, max_model_len=reg.model_max_len(model)))


@router.get("/health")
async def health() -> Response:
    """Liveness: the process serves HTTP. Readiness is /ready."""
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    st = api_state(request)
    reasons = []
    if st.drain.draining:
        reasons.append("draining")
    if not st.nc.is_connected:
        reasons.append("not connected to NATS")
    models = st.registry.models()
    if not models:
        reasons.append("no live worker")
    if reasons:
        return JSONResponse({"status": "unavailable", "reasons": reasons}, status_code=503)
    return JSONResponse({"status": "ready", "models": models})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    st = api_state(request)
    body = render(st.prom)
    gw = st.gateway
    if gw is not None and gw.tenant_prom is not None:
        if gw.shows_tenant_metrics(request.headers.get("authorization")):
            body += render(gw.tenant_prom)
    return Response(body, media_type=CONTENT_TYPE)
