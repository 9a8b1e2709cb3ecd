"""Ollama's embedding routes: POST /api/embed and the legacy /api/embeddings.

`/api/embed` returns L2-normalized vectors (as Ollama does), one per input, truncating
inputs longer than the context unless `truncate: false`; the legacy route returns one
unnormalized vector for `prompt`. `pooling` ("last" or "mean") is a jetserve extension.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from services.api.embeddings.run import (
    check_dimensions,
    embed,
    embedding_prompts,
    prepare_embedding,
    shorten,
)
from services.api.ollama.prompts import capped_model
from services.api.ollama.responses import NS, ollama_name
from services.api.ollama.routes import resolve
from services.api.ollama.schemas import EmbedRequest, LegacyEmbeddingsRequest
from services.api.request_body import parse_body
from services.api.state import api_state

router = APIRouter()


@router.post("/api/embed")
async def embed_route(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(EmbedRequest, await request.body())
    check_dimensions(req.dimensions)
    model = await resolve(st, req.model)
    capped = capped_model(model, req.options.num_ctx if req.options else None)
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    ids = [model.tokenizer.encode(text) if text else [] for text in inputs]
    prompts = embedding_prompts(ids, capped, req.truncate is not False)
    result = await embed(st, model, prepare_embedding(prompts, req.pooling, True), None)
    return JSONResponse(
        {
            "model": ollama_name(model.name),
            "embeddings": [shorten(v, req.dimensions, True) for v in result.vectors],
            "total_duration": int(result.duration_s * NS),
            "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


@router.post("/api/embeddings")
async def legacy_embeddings(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(LegacyEmbeddingsRequest, await request.body())
    model = await resolve(st, req.model)
    if not req.prompt:
        return JSONResponse({"embedding": []})
    capped = capped_model(model, req.options.num_ctx if req.options else None)
    prompts = embedding_prompts([model.tokenizer.encode(req.prompt)], capped, True, "prompt")
    result = await embed(st, model, prepare_embedding(prompts, req.pooling, False), None)
    return JSONResponse({"embedding": result.vectors[0]})
