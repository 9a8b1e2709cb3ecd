"""HTTP routes: the OpenAI endpoints plus /health, /ready and /metrics.

Handlers stay thin: parse the body strictly, resolve the model from the registry,
prepare the job (all 4xx checks happen before anything is published), then stream or
collect the generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import structlog
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from services.api.chat import chat_response, chat_stream
from services.api.client_disconnect import ClientDisconnected, unless_disconnected
from services.api.completions import completion_response, completion_stream
from services.api.errors import APIError, bad_request
from services.api.job_builder import prepare_chat, prepare_completion
from services.api.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from services.api.reattach import open_generation, request_cursor
from services.api.sse import EventStreamResponse
from shared.metrics import CONTENT_TYPE, render

if TYPE_CHECKING:
    from services.api.app import ApiState

log = structlog.get_logger("jetserve.api")
router = APIRouter()
M = TypeVar("M", bound=BaseModel)

CLIENT_CLOSED_REQUEST = 499  # nginx's code; the client never sees it, logs and metrics do


def _state(request: Request) -> ApiState:
    return request.app.state.api


_UNION_TAGS = {"str", "int", "float", "bool", "function-after"}


def _is_union_tag(part: object) -> bool:
    """pydantic puts the union member tried ('str', 'list[int]') into error locations."""
    return isinstance(part, str) and ("[" in part or part in _UNION_TAGS or part[:1].isupper())


def validation_error(e: ValidationError) -> APIError:
    """The first problem, phrased for a client: which parameter, what was expected."""
    errors = e.errors(include_url=False)
    err = errors[0]
    if err["type"] == "json_invalid":
        return bad_request(
            f"We could not parse the JSON body of your request: {err['msg']}", code="invalid_json"
        )

    def param_of(error: dict) -> str:
        return ".".join(str(p) for p in error["loc"] if not _is_union_tag(p))

    param = param_of(err) or None
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    if param is None:
        return bad_request(f"Invalid request body: {err['msg']}")
    tried = [
        next((p for p in x["loc"] if _is_union_tag(p)), None)
        for x in errors
        if param_of(x).startswith(param)
    ]
    tried = list(dict.fromkeys(t for t in tried if t))
    if len(tried) > 1:
        return bad_request(
            f"Invalid type for '{param}': expected one of {', '.join(tried)}.", param=param
        )
    return bad_request(f"Invalid value for '{param}': {err['msg']}", param=param)


def parse_body(model: type[M], body: bytes) -> M:
    if not body:
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    st = _state(request)
    req = parse_body(CompletionRequest, await request.body())
    cursor = request_cursor(request)  # a re-attach: Last-Event-ID or ?after=
    model = await st.resolve(req.model, require_live=cursor is None)
    prepared = prepare_completion(req, model)
    gen = await open_generation(st, cursor, model, prepared, req.user, bool(req.stream))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = completion_stream(gen, include_usage, req.logprobs)
        return EventStreamResponse(events, on_close=lambda: st.finish(gen))
    try:
        result = await unless_disconnected(request, completion_response(gen, req.logprobs))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        st.finish(gen)
    return _json(result)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    st = _state(request)
    req = parse_body(ChatCompletionRequest, await request.body())
    cursor = request_cursor(request)  # a re-attach: Last-Event-ID or ?after=
    model = await st.resolve(req.model, require_live=cursor is None)
    prepared = prepare_chat(req, model)
    gen = await open_generation(st, cursor, model, prepared, req.user, bool(req.stream))
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = chat_stream(gen, include_usage, top_logprobs)
        return EventStreamResponse(events, on_close=lambda: st.finish(gen))
    try:
        result = await unless_disconnected(request, chat_response(gen, top_logprobs))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        st.finish(gen)
    return _json(result)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    reg = _state(request).registry
    cards = [ModelCard(id=m, max_model_len=reg.model_max_len(m)) for m in reg.models()]
    return _json(ModelList(data=cards))


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> Response:
    reg = _state(request).registry
    if model not in reg.models():
        raise APIError(404, f"The model '{model}' does not exist", "model", "model_not_found")
    return _json(ModelCard(id=model, max_model_len=reg.model_max_len(model)))


@router.get("/health")
async def health() -> Response:
    """Liveness: the process serves HTTP. Readiness is /ready."""
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    st = _state(request)
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
    return Response(render(_state(request).prom), media_type=CONTENT_TYPE)
