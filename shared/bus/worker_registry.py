"""The worker registry record: what a worker heartbeats into KV bucket `llm_workers`.

Key `<model>.<worker_id>` (shared.bus.subjects.worker_key), JSON value. The bucket's TTL
drops a worker that stops heartbeating; a clean exit deletes its key. The API lists
live models from here (GET /v1/models, /ready) and reads `max_model_len` to validate
max_tokens. JSON, not msgpack, so `nats kv get` shows it to an operator as is.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared.bus.subjects import sanitize_model, worker_key
from shared.messages import MessageError


@dataclass
class WorkerStatus:
    worker_id: str
    model: str  # served model name (unsanitized)
    capacity: int  # max_num_seqs
    max_model_len: int
    kv_cache_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    prefix_cache_hit_rate: float = 0.0
    metrics_port: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    # What the model is, for Ollama's /api/tags, /api/show and /api/ps (optional: older
    # workers leave them out and readers fall back to defaults).
    family: str = ""  # llama | mistral | qwen2 | qwen3
    num_parameters: int = 0
    dtype: str = ""  # float32 | bfloat16 | float16
    model_bytes: int = 0  # size of the weight files
    model_digest: str = ""  # sha256 hex identifying the checkpoint
    # Prefix routing (docs/routing.md): the KV block size the worker hashes with, the
    # (epoch, seq) of its latest KV event (a reader behind it asks for a snapshot), and the
    # subject of jobs routed to it ("" from a worker that does not read one: never routed).
    block_size: int = 0
    kv_epoch: int = 0
    kv_seq: int = 0
    routed_subject: str = ""

    @property
    def key(self) -> str:
        return worker_key(self.model, self.worker_id)


def encode_status(status: WorkerStatus) -> bytes:
    return json.dumps(asdict(status), separators=(",", ":")).encode()


def decode_status(data: bytes) -> WorkerStatus:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"worker status: not JSON ({e})") from e
    if not isinstance(raw, dict):
        raise MessageError("worker status: not a JSON object")
    values: dict[str, Any] = {}
    for f in fields(WorkerStatus):
        if f.name not in raw:
            if f.default is MISSING:
                raise MessageError(f"worker status: missing field {f.name!r}")
            continue
        value = raw[f.name]
        if f.type == "str":
            ok = isinstance(value, str)
        elif f.type == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        if not ok:
            raise MessageError(f"worker status: field {f.name!r} must be {f.type}")
        values[f.name] = value
    return WorkerStatus(**values)


async def put_status(kv: KeyValue, status: WorkerStatus) -> None:
    await kv.put(status.key, encode_status(status))


async def delete_status(kv: KeyValue, model: str, worker_id: str) -> None:
    await kv.delete(worker_key(model, worker_id))


async def live_workers(kv: KeyValue, model: str | None = None) -> list[WorkerStatus]:
    """Workers whose heartbeat has not expired, optionally of one model; bad entries skipped."""
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    prefix = f"{sanitize_model(model)}." if model else ""
    out = []
    for key in keys:
        if not key.startswith(prefix):
            continue
        try:
            entry = await kv.get(key)
            out.append(decode_status(entry.value or b""))
        except (KeyNotFoundError, MessageError):
            continue  # deleted or expired since keys(), or written by something else
    return out
