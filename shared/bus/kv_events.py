"""What a worker says about its KV cache: block hashes stored and evicted, and snapshots.

A worker publishes one `KvEvents` per engine step that changed its prefix cache, on the
core subject `llm.kv.<model>.<worker>` (shared.bus.subjects.kv_events_subject). Core
NATS is at most once, so every message carries the worker's `epoch` (one per process
start) and a `seq` that counts up by one per message within the epoch: a reader that
sees a seq jump knows it missed changes and asks the worker for a `KvSnapshot`
(request/reply on `llm.kvsnap.<model>.<worker>`): every hash the worker holds, and the
seq it reflects. Its registry heartbeat repeats the latest (epoch, seq), so a loss at the
end of a burst is noticed within a heartbeat too. Hashes are the chained block hashes of
shared.kv_blocks, 16 bytes each. msgpack, versioned like shared.messages; a malformed
message raises MessageError (the reader logs and drops it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from shared.messages import MessageError

KV_SCHEMA_VERSION = 1
HASH_BYTES = 16
MAX_HASHES = 4_000_000  # a snapshot of a very large cache still decodes; beyond is garbage


@dataclass
class KvEvents:
    """One engine step's changes to a worker's cached block hashes."""

    worker_id: str
    epoch: int
    seq: int  # 1, 2, 3, ... within the epoch
    stored: list[bytes] = field(default_factory=list)
    evicted: list[bytes] = field(default_factory=list)
    block_size: int = 0


@dataclass
class KvSnapshot:
    """Every block hash a worker holds, as of event `seq` of `epoch` (0: no event yet)."""

    worker_id: str
    epoch: int
    seq: int
    hashes: list[bytes] = field(default_factory=list)
    block_size: int = 0
    # A large cache answers in several messages (each under NATS's max_payload), all built
    # from one state of the cache: part 0..parts-1, merged by the reader.
    part: int = 0
    parts: int = 1


SNAPSHOT_PART_HASHES = 16_384  # 16,384 x 18 bytes packed: ~300 KB a message


def snapshot_parts(snap: KvSnapshot, per_part: int = SNAPSHOT_PART_HASHES) -> list[KvSnapshot]:
    """The snapshot split into messages of at most `per_part` hashes (at least one)."""
    chunks = [snap.hashes[i : i + per_part] for i in range(0, len(snap.hashes), per_part)] or [[]]
    return [
        KvSnapshot(snap.worker_id, snap.epoch, snap.seq, chunk, snap.block_size, i, len(chunks))
        for i, chunk in enumerate(chunks)
    ]


def merge_parts(parts: list[KvSnapshot]) -> KvSnapshot:
    """One snapshot from all its parts; MessageError if they do not belong together."""
    if not parts:
        raise MessageError("kv snapshot: no parts")
    first = parts[0]
    by_index = {p.part: p for p in parts}
    heads = {(p.worker_id, p.epoch, p.seq, p.parts) for p in parts}
    if len(heads) != 1 or sorted(by_index) != list(range(first.parts)):
        raise MessageError("kv snapshot: parts missing or from different snapshots")
    hashes = [h for i in range(first.parts) for h in by_index[i].hashes]
    return KvSnapshot(first.worker_id, first.epoch, first.seq, hashes, first.block_size)


def _field(m: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in m:
        raise MessageError(f"{what}: missing field {key!r}")
    value = m[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MessageError(f"{what}: field {key!r} must be {kind.__name__}")
    return value


def _hashes(m: dict[str, Any], key: str, what: str) -> list[bytes]:
    value = m.get(key, [])
    if not isinstance(value, list) or len(value) > MAX_HASHES:
        raise MessageError(f"{what}: field {key!r} must be a list of hashes")
    for h in value:
        if not isinstance(h, bytes) or len(h) != HASH_BYTES:
            raise MessageError(
                f"{what}: {key!r} holds a value that is not a {HASH_BYTES}-byte hash"
            )
    return value


def _unpack(data: bytes, what: str) -> dict[str, Any]:
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise MessageError(f"{what}: not valid msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(m, dict):
        raise MessageError(f"{what}: not a map")
    if m.get("v") != KV_SCHEMA_VERSION:
        raise MessageError(f"{what}: unsupported schema version {m.get('v')!r}")
    return m


def _head(m: dict[str, Any], what: str) -> tuple[str, int, int, int]:
    worker_id = _field(m, "w", str, what)
    epoch = _field(m, "e", int, what)
    seq = _field(m, "s", int, what)
    block_size = m.get("bs", 0)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 0:
        raise MessageError(f"{what}: field 'bs' must be a non-negative int")
    if seq < 0 or epoch < 0:
        raise MessageError(f"{what}: epoch and seq must not be negative")
    return worker_id, epoch, seq, block_size


def _head_fields(m: KvEvents | KvSnapshot) -> dict[str, Any]:
    """The fields both messages open with, as `_head` reads them back."""
    return {"v": KV_SCHEMA_VERSION, "w": m.worker_id, "e": m.epoch, "s": m.seq, "bs": m.block_size}


def encode_kv_events(ev: KvEvents) -> bytes:
    return msgpack.packb({**_head_fields(ev), "st": ev.stored, "ev": ev.evicted})


def decode_kv_events(data: bytes) -> KvEvents:
    what = "kv events"
    m = _unpack(data, what)
    worker_id, epoch, seq, block_size = _head(m, what)
    if seq < 1:
        raise MessageError(f"{what}: seq starts at 1")
    stored, evicted = _hashes(m, "st", what), _hashes(m, "ev", what)
    return KvEvents(worker_id, epoch, seq, stored, evicted, block_size)


def encode_kv_snapshot(snap: KvSnapshot) -> bytes:
    return msgpack.packb({**_head_fields(snap), "h": snap.hashes, "p": snap.part, "n": snap.parts})


def decode_kv_snapshot(data: bytes) -> KvSnapshot:
    what = "kv snapshot"
    m = _unpack(data, what)
    worker_id, epoch, seq, block_size = _head(m, what)
    part, parts = m.get("p", 0), m.get("n", 1)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (part, parts)) or not (
        0 <= part < parts <= 10_000
    ):
        raise MessageError(f"{what}: part must be in [0, parts)")
    return KvSnapshot(worker_id, epoch, seq, _hashes(m, "h", what), block_size, part, parts)
