"""Ollama's model management: POST /api/pull and DELETE /api/delete, on the NATS store.

jetserve's models live in the JetStream object store (`jetserve models push`), where any
worker fetches them by name; API replicas keep no model files. So `pull` makes a model
available to the cluster: a model already stored reports its files (digest, size) as
pulled and verified; a model a worker serves without a stored copy is already there.
`delete` removes a stored model (workers serving it keep running).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from services.api.errors import APIError, bad_request
from services.api.ollama.responses import NDJSON_MEDIA_TYPE, line
from services.api.ollama.routes import model_names, served_name
from services.api.ollama.schemas import ModelRequest, PullRequest
from services.api.request_body import parse_body
from services.api.state import ApiState, api_state
from services.api.streaming.sse import EventStreamResponse
from shared.model_store import Manifest, get_manifest, remove

router = APIRouter()


def _not_found(name: str) -> APIError:
    return APIError(404, f"pull model manifest: model '{name}' is not in the model store")


async def stored_manifest(st: ApiState, name: str) -> Manifest | None:
    for candidate in model_names(name):
        manifest = await get_manifest(st.js, candidate)
        if manifest is not None:
            return manifest
    return None


def pull_lines(manifest: Manifest | None) -> list[dict[str, Any]]:
    """Ollama's status sequence; the layers are the stored files, already complete."""
    out: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    for f in manifest.files if manifest else []:
        digest = f"sha256:{f.sha256}"
        out.append({"status": f"pulling {f.sha256[:12]}", "digest": digest, "total": f.size,
                    "completed": f.size})  # fmt: skip
    out += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}]
    out.append({"status": "success"})
    return out


async def _stream(lines: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for obj in lines:
        yield line(obj)


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(PullRequest, await request.body())
    name = req.model_name
    if not name:
        raise bad_request("model is required")
    manifest = await stored_manifest(st, name)
    if manifest is None and served_name(st, name) is None:
        raise _not_found(name)
    lines = pull_lines(manifest)
    if req.stream is False:
        return JSONResponse(lines[-1])
    return EventStreamResponse(_stream(lines), lambda: None, media_type=NDJSON_MEDIA_TYPE)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(ModelRequest, await request.body())
    name = req.model_name
    if not name:
        raise bad_request("model is required")
    manifest = await stored_manifest(st, name)
    if manifest is None:
        raise APIError(404, f"model '{name}' not found")
    await remove(st.js, manifest.name)
    return Response(status_code=200)
