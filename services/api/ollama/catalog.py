"""Ollama's model catalogue routes: /api/version, /api/tags, /api/show, /api/ps.

Everything comes from the worker registry (what each worker heartbeats: family, size,
dtype, digest, context length) and the model's tokenizer files in NATS, so any API
replica answers the same without a model volume.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from services.api.errors import bad_request
from services.api.model_registry import ModelRegistry
from services.api.ollama.prompts import DEFAULTS, capabilities, effective_options
from services.api.ollama.responses import ollama_name
from services.api.ollama.routes import resolve
from services.api.ollama.schemas import ModelRequest
from services.api.request_body import parse_body
from services.api.state import api_state
from shared.bus.model_store import Manifest, list_models
from shared.bus.worker_registry import WorkerStatus

router = APIRouter()

# The Ollama API version this dialect follows (clients gate features on it).
OLLAMA_API_VERSION = "0.12.6"
DTYPE_LEVELS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def parameter_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts or 0, UTC).isoformat().replace("+00:00", "Z")


def _status(registry: ModelRegistry, model: str) -> WorkerStatus | None:
    workers = registry.live_workers(model)
    return max((w.status for w in workers), key=lambda s: s.started_at) if workers else None


def details(status: WorkerStatus | None) -> dict[str, Any]:
    family = status.family if status else ""
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(status.num_parameters) if status else "",
        "quantization_level": DTYPE_LEVELS.get(status.dtype, status.dtype.upper())
        if status
        else "",
    }


def tag_entry(model: str, status: WorkerStatus | None) -> dict[str, Any]:
    name = ollama_name(model)
    return {
        "name": name,
        "model": name,
        "modified_at": _iso(status.started_at if status else 0),
        "size": status.model_bytes if status else 0,
        "digest": status.model_digest if status else "",
        "details": details(status),
    }


@router.get("/api/version")
async def version() -> Response:
    return JSONResponse({"version": OLLAMA_API_VERSION})


def stored_entry(manifest: Manifest) -> dict[str, Any]:
    """A model pushed to the store that no worker serves yet (a worker can start on it)."""
    name = ollama_name(manifest.name)
    return {
        "name": name,
        "model": name,
        "modified_at": _iso(manifest.created_at),
        "size": manifest.total_bytes,
        "digest": manifest.digest,
        "details": details(None),
    }


@router.get("/api/tags")
async def tags(request: Request) -> Response:
    """Served models, then models in the NATS store that no worker serves."""
    st = api_state(request)
    reg = st.registry
    served = reg.models()
    models = [tag_entry(m, _status(reg, m)) for m in served]
    models += [stored_entry(m) for m in await list_models(st.js) if m.name not in served]
    return JSONResponse({"models": models})


@router.get("/api/ps")
async def ps(request: Request) -> Response:
    reg = api_state(request).registry
    expires = (datetime.now(UTC) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    out = []
    for m in reg.models():
        status = _status(reg, m)
        entry = tag_entry(m, status)
        del entry["modified_at"]
        entry.update(
            expires_at=expires,
            size_vram=entry["size"],
            context_length=reg.model_max_len(m) or 0,
        )
        out.append(entry)
    return JSONResponse({"models": out})


def _parameters(opts: dict[str, Any], stops: list[str]) -> str:
    lines = [f"{k:<15}{opts[k]}" for k in (*DEFAULTS, "min_p", "repeat_penalty") if k in opts]
    lines += [f'{"stop":<15}"{s}"' for s in stops]
    return "\n".join(lines)


@router.post("/api/show")
async def show(request: Request) -> Response:
    st = api_state(request)
    req = parse_body(ModelRequest, await request.body())
    if not req.model_name:
        raise bad_request("model is required")
    model = await resolve(st, req.model_name)
    status = _status(st.registry, model.name)
    family = status.family if status else "llama"
    opts = effective_options(model, None).model_dump(exclude_none=True)
    eos = model.tokenizer.eos_token
    info: dict[str, Any] = {
        "general.architecture": family,
        "general.parameter_count": status.num_parameters if status else 0,
        f"{family}.context_length": model.max_model_len or 0,
    }
    return JSONResponse(
        {
            "modelfile": f"# served by jetserve\nFROM {model.name}\n",
            "parameters": _parameters(opts, [eos] if eos else []),
            "template": model.tokenizer.chat_template or "",
            "details": details(status),
            "model_info": info,
            "capabilities": capabilities(model),
            "modified_at": _iso(status.started_at if status else 0),
        }
    )
