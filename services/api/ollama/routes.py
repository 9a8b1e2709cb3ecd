"""Ollama's generation routes: POST /api/generate and /api/chat, and the root probe.

Same path as the OpenAI routes: parse strictly, resolve the model from the registry,
prepare the job (every 4xx before anything is published), start it through the gateway
(keys, limits, metering), then stream NDJSON (Ollama's default) or collect one object.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from services.api.client_disconnect import collected_response
from services.api.errors import APIError
from services.api.jobs.builder import check_texts_fit
from services.api.model_registry import ServedModel
from services.api.ollama.prompts import chat_prompt, generate_prompt
from services.api.ollama.responses import (
    CHAT,
    GENERATE,
    NDJSON_MEDIA_TYPE,
    Dialect,
    collect,
    load_response,
    ndjson_stream,
)
from services.api.ollama.schemas import ChatRequest, GenerateRequest
from services.api.request_body import parse_body
from services.api.state import ApiState, api_state
from services.api.streaming.sse import EventStreamResponse

router = APIRouter()


def model_names(name: str) -> list[str]:
    """`tiny` is `tiny:latest` to Ollama; accept either spelling of a served name."""
    names = [name]
    if name.endswith(":latest"):
        names.append(name.removesuffix(":latest"))
    return names


def model_not_found(name: str) -> APIError:
    return APIError(404, f"model '{name}' not found", param="model", code="model_not_found")


def served_name(st: ApiState, name: str) -> str | None:
    live = set(st.registry.models())
    return next((n for n in model_names(name) if n in live), None)


async def resolve(st: ApiState, name: str) -> ServedModel:
    found = served_name(st, name)
    if found is None:
        raise model_not_found(name)
    return await st.resolve(found)


@router.get("/")
@router.head("/")
async def root() -> Response:
    return PlainTextResponse("Ollama is running")


async def _run(
    request: Request, st: ApiState, model: ServedModel, shape, stream: bool, dialect: Dialect
) -> Response:
    gen = await st.start_generation(model, shape.prepared, None)
    if stream:
        events = ndjson_stream(gen, shape, dialect)
        return EventStreamResponse(events, lambda: st.finish(gen), media_type=NDJSON_MEDIA_TYPE)
    work = collect(gen, shape, dialect)
    return await collected_response(request, work, JSONResponse, lambda: st.finish(gen))


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(GenerateRequest, await request.body())
    model = await resolve(st, req.model)
    if not req.prompt and not req.suffix and not req.context:
        return JSONResponse(load_response(model.name, chat=False))
    check_texts_fit([(req.system or "") + (req.prompt or "") + (req.suffix or "")], model, "prompt")
    shape = await st.off_loop(generate_prompt, req, model)
    return await _run(request, st, model, shape, req.stream is not False, GENERATE)


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(ChatRequest, await request.body())
    model = await resolve(st, req.model)
    if not req.messages:
        return JSONResponse(load_response(model.name, chat=True))
    check_texts_fit(["".join(m.content or "" for m in req.messages)], model, "messages")
    shape = await st.off_loop(chat_prompt, req, model)
    return await _run(request, st, model, shape, req.stream is not False, CHAT)
