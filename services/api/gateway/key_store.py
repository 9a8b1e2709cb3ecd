"""The API keys every replica knows, kept in sync with the `llm_api_keys` KV bucket.

Each API replica watches the bucket and keeps an in-memory map, so checking a key costs
no NATS round trip, and a key created or revoked by `jetserve keys` reaches every
replica within the watch's delivery time (milliseconds) without restarts.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue

from services.api.gateway.keys import KEYS_BUCKET, ApiKeyRecord, KeyRecordError, hash_secret
from shared.bus.jetstream import open_kv_bucket

log = structlog.get_logger("jetserve.api.keys")


async def keys_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Open or create the bucket; a little history keeps an audit trail of changes."""
    return await open_kv_bucket(js, KEYS_BUCKET, history=5, replicas=replicas)


async def all_records(kv: KeyValue) -> list[ApiKeyRecord]:
    records = []
    try:
        names = await kv.keys()
    except NoKeysError:
        return []
    for name in names:
        try:
            entry = await kv.get(name)
        except KeyNotFoundError:
            continue
        try:
            records.append(ApiKeyRecord.from_json(entry.value or b""))
        except KeyRecordError as e:
            log.warning("bad_key_record", key=name, error=str(e))
    return sorted(records, key=lambda r: r.created_at)


async def put_record(kv: KeyValue, record: ApiKeyRecord) -> None:
    await kv.put(record.secret_sha256, record.to_json())


async def seed_records(kv: KeyValue, records: list[ApiKeyRecord]) -> int:
    """Write keys from the file/env; a stored record keeps its revoked flag.

    So a seeded key revoked with `jetserve keys revoke` stays revoked across restarts
    even though its secret is still in the file. Returns how many records changed.
    """
    changed = 0
    for record in records:
        for _ in range(5):  # another replica may seed the same key concurrently
            try:
                entry = await kv.get(record.secret_sha256)
            except KeyNotFoundError:
                try:
                    await kv.create(record.secret_sha256, record.to_json())
                    changed += 1
                    break
                except KeyWrongLastSequenceError:
                    continue
            try:
                stored = ApiKeyRecord.from_json(entry.value or b"")
            except KeyRecordError:
                stored = None
            merged = record
            if stored is not None:
                merged = replace(
                    record,
                    id=stored.id,
                    created_at=stored.created_at,
                    revoked=stored.revoked,
                    revoked_at=stored.revoked_at,
                )
                if merged == stored:
                    break
            try:
                await kv.update(record.secret_sha256, merged.to_json(), last=entry.revision)
                changed += 1
                break
            except KeyWrongLastSequenceError:
                continue
    return changed


async def revoke(kv: KeyValue, key_id: str) -> ApiKeyRecord | None:
    """Mark the key with this id revoked (the record stays for audit); None if unknown."""
    for record in await all_records(kv):
        if record.id == key_id:
            if record.revoked:
                return record
            revoked = record.revoke()
            await put_record(kv, revoked)
            return revoked
    return None


@dataclass
class KeyStore:
    """Hash -> record map mirrored from the bucket by a KV watch."""

    kv: KeyValue
    by_hash: dict[str, ApiKeyRecord] = field(default_factory=dict)
    _watcher: Any = None
    _task: asyncio.Task | None = None
    _synced: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, sync_timeout_s: float = 5.0) -> None:
        self._watcher = await self.kv.watchall()
        self._task = asyncio.create_task(self._watch(), name="api-keys-watch")
        try:
            await asyncio.wait_for(self._synced.wait(), timeout=sync_timeout_s)
        except TimeoutError:
            log.warning("api_keys_initial_sync_slow")

    async def stop(self) -> None:
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception as e:  # the connection may be closed already
                log.debug("api_keys_watch_stop_failed", error=str(e))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # end of the initial values
                self._synced.set()
                continue
            self.apply(entry.key, entry.value, entry.operation)
            if entry.delta == 0:
                self._synced.set()

    def apply(self, key: str, value: bytes | None, operation: str | None) -> None:
        if operation in ("DEL", "PURGE") or not value:
            self.by_hash.pop(key, None)
            return
        try:
            record = ApiKeyRecord.from_json(value)
        except KeyRecordError as e:
            log.warning("bad_key_record", key=key, error=str(e))
            self.by_hash.pop(key, None)
            return
        if record.secret_sha256 != key:
            log.warning("key_record_hash_mismatch", key=key, key_id=record.id)
            self.by_hash.pop(key, None)
            return
        self.by_hash[key] = record

    def lookup(self, secret: str) -> ApiKeyRecord | None:
        """The record whose hash matches the presented secret (revoked ones included)."""
        digest = hash_secret(secret)
        record = self.by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.secret_sha256, digest):
            return None
        return record

    @property
    def active_keys(self) -> int:
        return sum(1 for r in self.by_hash.values() if not r.revoked)
