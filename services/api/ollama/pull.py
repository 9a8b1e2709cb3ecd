"""Ollama's model management: POST /api/pull and DELETE /api/delete, on the NATS store.

jetserve's models live in the JetStream object store (`jetserve models push`), where any
worker fetches them by name; API replicas keep no model files. So `pull` makes a model
available to the cluster: a model already stored reports its files (digest, size) as
pulled and verified; a model a worker serves without a stored copy is already there.
`delete` removes a stored model (workers serving it keep running). A Hugging Face hub
id that is neither stored nor served is downloaded with huggingface_hub into a temporary
folder and pushed into the store, with byte progress for both legs; afterwards any
worker serves it by name from NATS.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
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
from shared.bus.model_store import Manifest, ModelStoreError, get_manifest, push, remove
from shared.hub import HubError, bytes_under, download, is_hub_id, model_files

router = APIRouter()
PROGRESS_INTERVAL_S = 0.5


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


async def _stream(lines: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for obj in lines:
        yield obj


async def _progress(task: asyncio.Task, status: str, total: int, done) -> AsyncIterator[dict]:
    """A status line with the bytes moved, twice a second, until `task` ends."""
    while not task.done():
        yield {"status": status, "total": total, "completed": min(done(), total)}
        await asyncio.wait([task], timeout=PROGRESS_INTERVAL_S)
    task.result()  # raises what the transfer raised
    yield {"status": status, "total": total, "completed": total}


async def hub_pull_lines(
    st: ApiState, repo: str, files: list[tuple[str, int]]
) -> AsyncIterator[dict[str, Any]]:
    """Download a hub id with huggingface_hub, then push it into the NATS store."""
    yield {"status": "pulling manifest"}
    tmp = Path(tempfile.mkdtemp(prefix="jetserve-pull-"))
    try:
        total = sum(size for _, size in files)
        task = asyncio.create_task(asyncio.to_thread(download, repo, None, tmp))
        async for obj in _progress(task, f"pulling {repo}", total, lambda: bytes_under(tmp)):
            yield obj
        folder: Path = task.result()
        pushed = [0]

        def moved(n: int) -> None:
            pushed[0] += n

        task = asyncio.create_task(push(st.js, folder, repo, moved, st.settings.stream_replicas))
        async for obj in _progress(task, "pushing to the model store", total, lambda: pushed[0]):
            yield obj
        for f in task.result().files:
            yield {"status": f"verified {f.path}", "digest": f"sha256:{f.sha256}",
                   "total": f.size, "completed": f.size}  # fmt: skip
        yield {"status": "writing manifest"}
        yield {"status": "success"}
    except (HubError, ModelStoreError) as e:
        yield {"error": str(e)}
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(PullRequest, await request.body())
    name = req.model_name
    if not name:
        raise bad_request("model is required")
    manifest = await stored_manifest(st, name)
    if manifest is None and served_name(st, name) is None:
        if not is_hub_id(name):
            raise _not_found(name)
        try:  # an unknown repo or a refused token: an HTTP error before any line is sent
            files = await asyncio.to_thread(model_files, name, None)
        except HubError as e:
            raise APIError(404, f"pull model manifest: {e}") from e
        lines = hub_pull_lines(st, name, files)
    else:
        lines = _stream(pull_lines(manifest))
    if req.stream is False:
        last: dict[str, Any] = {}
        async for last in lines:
            if "error" in last:
                raise APIError(502, last["error"])
        return JSONResponse(last)
    return EventStreamResponse(_lines(lines), lambda: None, media_type=NDJSON_MEDIA_TYPE)


async def _lines(objs: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for obj in objs:
        yield line(obj)


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
