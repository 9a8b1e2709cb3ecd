"""POST /v1/embeddings (OpenAI) from the served decoder models.

Extensions beyond OpenAI's fields: `pooling` ("last" token, the default, or "mean") and
`normalize` (default true). `encoding_format: "base64"` (what the OpenAI SDK asks for by
default) returns little-endian float32 bytes, base64-encoded.
"""

from __future__ import annotations

import base64
from array import array
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, Response

from services.api.embeddings.run import (
    check_dimensions,
    embed,
    embedding_prompts,
    prepare_embedding,
    shorten,
)
from services.api.request_body import parse_body
from services.api.state import api_state

router = APIRouter()


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    user: str | None = None
    pooling: Literal["last", "mean"] | None = None
    normalize: bool | None = True
    truncate: bool | None = False


def _token_inputs(req: EmbeddingRequest, encode) -> list[list[int]]:
    x = req.input
    if isinstance(x, str):
        return [encode(x)]
    if not x:
        return []
    if isinstance(x[0], str):
        return [encode(s) for s in x]  # type: ignore[arg-type]
    if isinstance(x[0], int):
        return [list(x)]  # type: ignore[arg-type]
    return [list(ids) for ids in x]  # type: ignore[union-attr]


def _encoded(vector: list[float], fmt: str | None) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(array("f", vector).tobytes()).decode()
    return vector


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(EmbeddingRequest, await request.body())
    check_dimensions(req.dimensions)
    model = await st.resolve(req.model)
    prompts = embedding_prompts(
        _token_inputs(req, model.tokenizer.encode), model, bool(req.truncate)
    )
    normalize = req.normalize is not False
    prepared = prepare_embedding(prompts, req.pooling, normalize)
    result = await embed(st, model, prepared, req.user)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _encoded(shorten(v, req.dimensions, normalize), req.encoding_format),
        }
        for i, v in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return JSONResponse({"object": "list", "data": data, "model": model.name, "usage": usage})
