"""Versioned msgpack schemas for what travels over NATS: a Job in, Deltas out.

Both services import this one module so the wire format has a single definition.
Decoding is the trust boundary: every field is type-checked and anything malformed
raises `MessageError`, which callers turn into a logged, terminally acknowledged
message instead of a crash loop. Unknown extra keys are ignored so a newer producer can
add optional fields without a version bump. A job of a version above every one its
reader knows raises `NewerVersion` instead: it is not malformed, only too new for this
reader, and a worker leaves it for one that reads it (docs/upgrading.md).
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shared.sampling_params import SamplingParams
from shared.structured_output import from_wire as structured_from_wire
from shared.structured_output import to_wire as structured_to_wire

SCHEMA_VERSION = 1  # the version this release writes
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")
FINISH_REASONS = frozenset({"stop", "length", "abort", "error"})

# (token_id, logprob, [(alt_token_id, alt_logprob), ...]) for one sampled token.
TokenLogprobTuple = tuple[int, float, list[tuple[int, float]]]


class MessageError(ValueError):
    """A message that cannot be decoded into a valid, known-version schema."""


class NewerVersion(MessageError):
    """A message of a schema version newer than any this reader knows (a rolling upgrade:
    a newer producer wrote it). Not malformed: a newer reader can read it."""

    def __init__(self, what: str, version: int) -> None:
        super().__init__(f"{what}: schema version {version} is newer than this reader knows")
        self.version = version


@dataclass
class Job:
    """One generation request, as the API publishes it to `llm.jobs.<model>`."""

    id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    created_at: float
    reply_to: str
    priority: int = 0  # lower runs first
    deadline: float | None = None  # unix seconds
    tags: dict[str, str] = field(default_factory=dict)  # key id, feature, user
    v: int = SCHEMA_VERSION


@dataclass
class CompletionChunk:
    """New tokens of one of a job's n completions in one engine step."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobTuple] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"


@dataclass
class Usage:
    """Accounting for a finished job, sent on its final Delta."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_time_s: float
    gpu_time_s: float


@dataclass
class Delta:
    """What one engine step produced for one job; `seq` counts from 0 per job."""

    job_id: str
    seq: int
    chunks: list[CompletionChunk]
    finished: bool = False
    usage: Usage | None = None
    error: str | None = None  # worker-side failure, always with finished=True
    worker_id: str = ""
    # An embedding job's pooled vector, on its final Delta. Optional on the wire (float32
    # little-endian bytes): a reader that predates it ignores the key.
    embedding: list[float] | None = None
    v: int = SCHEMA_VERSION


# --- validation helpers: one per wire type, each names the offending field ---------------


def _require(m: dict[str, Any], key: str, where: str) -> Any:
    if key not in m:
        raise MessageError(f"{where}: missing field {key!r}")
    return m[key]


def _int(value: Any, name: str) -> int:
    # bool is an int subclass in Python; on the wire it is a different type.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MessageError(f"{name} must be an integer, got {type(value).__name__}")
    return value


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise MessageError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise MessageError(f"{name} must be a boolean, got {type(value).__name__}")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise MessageError(f"{name} must be an array, got {type(value).__name__}")
    return list(value)


def _map(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MessageError(f"{name} must be a map, got {type(value).__name__}")
    return value


def _int_list(value: Any, name: str) -> list[int]:
    items = _list(value, name)
    for i, t in enumerate(items):
        _int(t, f"{name}[{i}]")
    return items


def _optional(value: Any, check, name: str) -> Any:
    return None if value is None else check(value, name)


def _unpack(
    data: bytes, what: str, versions: Collection[int] = (SCHEMA_VERSION,)
) -> dict[str, Any]:
    """The message's map, if its version is one of `versions`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise MessageError(f"{what}: not valid msgpack ({type(e).__name__}: {e})") from e
    m = _map(obj, what)
    version = m.get("v")
    if isinstance(version, int) and not isinstance(version, bool):
        if version in versions:
            return m
        if version > max(versions):
            raise NewerVersion(what, version)
    raise MessageError(f"{what}: unsupported schema version {version!r}")


# --- Job ---------------------------------------------------------------------------------


def _sampling_to_wire(s: SamplingParams) -> dict[str, Any]:
    wire = {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "seed": s.seed,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repetition_penalty": s.repetition_penalty,
        "logprobs": s.logprobs,
        "stop_token_ids": list(s.stop_token_ids),
        "ignore_eos": s.ignore_eos,
        "n": s.n,
    }
    if s.structured is not None:
        # Optional and only present when set: a v1 reader that predates it ignores the key.
        wire["structured"] = structured_to_wire(s.structured)
    if s.pooling is not None:  # optional too (embeddings); see Delta.embedding
        wire["pooling"] = s.pooling
        wire["normalize"] = s.normalize
    if not s.speculative:  # optional too: only the opt-out travels
        wire["speculative"] = False
    return wire


def _sampling_from_wire(value: Any) -> SamplingParams:
    m = _map(value, "sampling")
    d = SamplingParams()

    def get(key: str, check) -> Any:
        return check(m[key], f"sampling.{key}") if key in m else getattr(d, key)

    return SamplingParams(
        max_tokens=get("max_tokens", _int),
        temperature=get("temperature", _float),
        top_p=get("top_p", _float),
        top_k=get("top_k", _int),
        min_p=get("min_p", _float),
        seed=_optional(m.get("seed"), _int, "sampling.seed"),
        presence_penalty=get("presence_penalty", _float),
        frequency_penalty=get("frequency_penalty", _float),
        repetition_penalty=get("repetition_penalty", _float),
        logprobs=_optional(m.get("logprobs"), _int, "sampling.logprobs"),
        stop_token_ids=get("stop_token_ids", _int_list),
        ignore_eos=get("ignore_eos", _bool),
        n=get("n", _int),
        structured=_structured(m.get("structured")),
        pooling=_optional(m.get("pooling"), _str, "sampling.pooling"),
        normalize=get("normalize", _bool),
        speculative=get("speculative", _bool),
    )


def _structured(value: Any) -> Any:
    try:
        return structured_from_wire(value)
    except ValueError as e:
        raise MessageError(f"sampling.structured: {e}") from e


def encode_job(job: Job) -> bytes:
    return msgpack.packb(
        {
            "v": job.v,
            "id": job.id,
            "model": job.model,
            "prompt_token_ids": list(job.prompt_token_ids),
            "sampling": _sampling_to_wire(job.sampling),
            "priority": job.priority,
            "created_at": job.created_at,
            "deadline": job.deadline,
            "reply_to": job.reply_to,
            "tags": dict(job.tags),
        },
        use_bin_type=True,
    )


def decode_job(data: bytes, readers: Mapping[int, JobReader] | None = None) -> Job:
    """Decode and validate a Job; `readers` maps each wire version this reader knows to
    the function that reads its map (default JOB_READERS: this release's versions)."""
    readers = JOB_READERS if readers is None else readers
    m = _unpack(data, "job", readers.keys())
    job = readers[m["v"]](m)
    if not _JOB_ID.fullmatch(job.id):
        # The id becomes a subject token (llm.events.<id>, llm.cancel.<id>).
        raise MessageError(f"job: id {job.id!r} must be non-empty [A-Za-z0-9_-]")
    return job


def job_from_v1(m: dict[str, Any]) -> Job:
    """A version-1 job map (already unpacked) as a Job; MessageError if a field is bad."""
    tags = _map(m.get("tags", {}), "tags")
    for k, val in tags.items():
        _str(k, "tags key")
        _str(val, f"tags[{k!r}]")
    return Job(
        id=_str(_require(m, "id", "job"), "id"),
        model=_str(_require(m, "model", "job"), "model"),
        prompt_token_ids=_int_list(_require(m, "prompt_token_ids", "job"), "prompt_token_ids"),
        sampling=_sampling_from_wire(_require(m, "sampling", "job")),
        created_at=_float(_require(m, "created_at", "job"), "created_at"),
        reply_to=_str(_require(m, "reply_to", "job"), "reply_to"),
        priority=_int(m.get("priority", 0), "priority"),
        deadline=_optional(m.get("deadline"), _float, "deadline"),
        tags=dict(tags),
    )


JobReader = Callable[[dict[str, Any]], Job]
# Every Job version this release reads. A release that changes the Job's layout adds
# its version here and keeps the previous one, so adjacent releases share the queue.
JOB_READERS: dict[int, JobReader] = {1: job_from_v1}


# --- Delta -------------------------------------------------------------------------------


def pack_floats(values: list[float]) -> bytes:
    return array("f", values).tobytes() if sys.byteorder == "little" else _swapped(values)


def _swapped(values: list[float]) -> bytes:
    a = array("f", values)
    a.byteswap()
    return a.tobytes()


def unpack_floats(value: Any, name: str) -> list[float]:
    if not isinstance(value, bytes | bytearray) or len(value) % 4:
        raise MessageError(f"{name} must be float32 bytes")
    a = array("f")
    a.frombytes(bytes(value))
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def _chunk_to_wire(c: CompletionChunk) -> dict[str, Any]:
    return {
        "index": c.index,
        "token_ids": list(c.token_ids),
        "logprobs": None
        if c.logprobs is None
        else [[t, lp, [[a, alp] for a, alp in top]] for t, lp, top in c.logprobs],
        "finish_reason": c.finish_reason,
    }


def _logprob_from_wire(value: Any, name: str) -> TokenLogprobTuple:
    item = _list(value, name)
    if len(item) != 3:
        raise MessageError(f"{name} must be [token_id, logprob, top]")
    top = []
    for j, alt in enumerate(_list(item[2], f"{name}.top")):
        pair = _list(alt, f"{name}.top[{j}]")
        if len(pair) != 2:
            raise MessageError(f"{name}.top[{j}] must be [token_id, logprob]")
        top.append((_int(pair[0], f"{name}.top[{j}]"), _float(pair[1], f"{name}.top[{j}]")))
    return (_int(item[0], f"{name}.token_id"), _float(item[1], f"{name}.logprob"), top)


def _chunk_from_wire(value: Any, name: str) -> CompletionChunk:
    m = _map(value, name)
    reason = _optional(m.get("finish_reason"), _str, f"{name}.finish_reason")
    if reason is not None and reason not in FINISH_REASONS:
        raise MessageError(
            f"{name}.finish_reason {reason!r} is not one of {sorted(FINISH_REASONS)}"
        )
    raw_lps = m.get("logprobs")
    logprobs = (
        None
        if raw_lps is None
        else [
            _logprob_from_wire(x, f"{name}.logprobs[{i}]")
            for i, x in enumerate(_list(raw_lps, f"{name}.logprobs"))
        ]
    )
    return CompletionChunk(
        index=_int(_require(m, "index", name), f"{name}.index"),
        token_ids=_int_list(_require(m, "token_ids", name), f"{name}.token_ids"),
        logprobs=logprobs,
        finish_reason=reason,
    )


def _usage_from_wire(value: Any) -> Usage:
    m = _map(value, "usage")
    return Usage(
        prompt_tokens=_int(_require(m, "prompt_tokens", "usage"), "usage.prompt_tokens"),
        completion_tokens=_int(
            _require(m, "completion_tokens", "usage"), "usage.completion_tokens"
        ),
        cached_tokens=_int(_require(m, "cached_tokens", "usage"), "usage.cached_tokens"),
        queue_time_s=_float(_require(m, "queue_time_s", "usage"), "usage.queue_time_s"),
        gpu_time_s=_float(_require(m, "gpu_time_s", "usage"), "usage.gpu_time_s"),
    )


# One packer for every Delta (a worker encodes one per job per engine step): msgpack.packb
# would build a new one per call. It holds no state between calls (autoreset) and packs
# plain types without releasing the GIL, so sharing it across threads is safe.
_pack_delta = msgpack.Packer(use_bin_type=True).pack


def encode_delta(d: Delta) -> bytes:
    u = d.usage
    if u is None and d.embedding is None:
        # The common Delta (tokens, maybe a finish reason): the same map, built inline.
        chunks = []
        for c in d.chunks:
            if c.logprobs is not None:
                break
            chunks.append(
                {
                    "index": c.index,
                    "token_ids": c.token_ids,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
            )
        else:
            return _pack_delta(
                {
                    "v": d.v,
                    "job_id": d.job_id,
                    "seq": d.seq,
                    "chunks": chunks,
                    "finished": d.finished,
                    "usage": None,
                    "error": d.error,
                    "worker_id": d.worker_id,
                }
            )
    return _pack_delta(
        {
            "v": d.v,
            "job_id": d.job_id,
            "seq": d.seq,
            "chunks": [_chunk_to_wire(c) for c in d.chunks],
            "finished": d.finished,
            "usage": None
            if u is None
            else {
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "cached_tokens": u.cached_tokens,
                "queue_time_s": u.queue_time_s,
                "gpu_time_s": u.gpu_time_s,
            },
            "error": d.error,
            "worker_id": d.worker_id,
            **({} if d.embedding is None else {"embedding": pack_floats(d.embedding)}),
        }
    )


def _fast_delta(m: dict[str, Any]) -> Delta | None:
    """The common Delta (token chunks, no logprobs, no usage) checked inline; None hands
    anything else to the field-by-field decoder, which names what is wrong."""
    seq, job_id, raw_chunks = m.get("seq"), m.get("job_id"), m.get("chunks")
    if type(seq) is not int or seq < 0 or type(job_id) is not str or type(raw_chunks) is not list:
        return None
    finished, usage, error, worker = (
        m.get("finished", False), m.get("usage"), m.get("error"), m.get("worker_id", "")
    )  # fmt: skip
    if type(finished) is not bool or usage is not None or type(worker) is not str:
        return None
    if error is not None and type(error) is not str:
        return None
    chunks = []
    for c in raw_chunks:
        if type(c) is not dict or c.get("logprobs") is not None:
            return None
        index, tokens, reason = c.get("index"), c.get("token_ids"), c.get("finish_reason")
        if type(index) is not int or type(tokens) is not list:
            return None
        if reason is not None and reason not in FINISH_REASONS:
            return None
        for t in tokens:
            if type(t) is not int:
                return None
        chunks.append(CompletionChunk(index, tokens, None, reason))
    return Delta(job_id, seq, chunks, finished, None, error, worker)


def decode_delta(data: bytes) -> Delta:
    m = _unpack(data, "delta")
    return _fast_delta(m) or _delta_from_map(m)


def _delta_from_map(m: dict[str, Any]) -> Delta:
    """A Delta's map checked field by field (the error names the bad field)."""
    seq = _int(_require(m, "seq", "delta"), "seq")
    if seq < 0:
        raise MessageError(f"delta: seq must be >= 0, got {seq}")
    return Delta(
        job_id=_str(_require(m, "job_id", "delta"), "job_id"),
        seq=seq,
        chunks=[
            _chunk_from_wire(c, f"chunks[{i}]")
            for i, c in enumerate(_list(_require(m, "chunks", "delta"), "chunks"))
        ],
        finished=_bool(m.get("finished", False), "finished"),
        usage=None if m.get("usage") is None else _usage_from_wire(m["usage"]),
        error=_optional(m.get("error"), _str, "error"),
        worker_id=_str(m.get("worker_id", ""), "worker_id"),
        embedding=_optional(m.get("embedding"), unpack_floats, "embedding"),
    )


# --- a step's Deltas for one API replica ------------------------------------------------

_VERSION_KEY = msgpack.packb("v")
_DELTAS_KEY = msgpack.packb("deltas")


def encode_step_deltas(deltas: list[bytes]) -> bytes:
    """Encoded Deltas (each as `encode_delta` wrote it, possibly of many jobs) as one
    message: what a worker sends an API replica per engine step, after storing them.

    The map {"v": 1, "deltas": [delta, ...]} is spliced from the stored bytes (a msgpack
    array is its header followed by its items), so nothing is encoded twice and the
    reader unpacks the whole step at once.
    """
    n = len(deltas)
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    version = msgpack.packb(SCHEMA_VERSION)
    return b"".join((b"\x82", _VERSION_KEY, version, _DELTAS_KEY, header, *deltas))


def decode_step_deltas(data: bytes) -> list[Delta]:
    """The Deltas of a step message; MessageError if the message or any Delta is bad."""
    m = _unpack(data, "step deltas")
    out = []
    for i, item in enumerate(_list(_require(m, "deltas", "step deltas"), "deltas")):
        dm = _map(item, f"deltas[{i}]")
        if dm.get("v") != SCHEMA_VERSION:
            raise MessageError(f"deltas[{i}]: unsupported schema version {dm.get('v')!r}")
        out.append(_fast_delta(dm) or _delta_from_map(dm))
    return out
