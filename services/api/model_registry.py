"""Which models are served right now, and their tokenizers, read from NATS only.

Workers heartbeat into the `llm_workers` KV bucket; a watcher keeps a local copy so the
request path never waits on NATS to resolve a model. An entry counts as live while its
last heartbeat is younger than the bucket TTL (expiry itself may not reach a watcher).
Tokenizer files come from the `llm_models` object store, fetched once per model, so API
replicas need no model volume.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue

from services.api.streaming.token_text import TokenTexts
from shared.bus.subjects import MODELS_OBJECT_STORE, WORKERS_BUCKET, model_object_name
from shared.bus.worker_registry import WorkerStatus, decode_status
from shared.messages import MessageError
from shared.tokenizer import TOKENIZER_FILES, TokenizerBundle, load_tokenizer_files

log = structlog.get_logger("jetserve.api.registry")

# tokenizer_config's model_max_length is a huge sentinel when the model sets none.
_MAX_SANE_LEN = 10_000_000


@dataclass
class WorkerEntry:
    """One worker's last heartbeat; `seen` is on this process's monotonic clock."""

    key: str
    status: WorkerStatus
    seen: float

    @property
    def model(self) -> str:
        return self.status.model

    @property
    def max_model_len(self) -> int | None:
        return self.status.max_model_len if self.status.max_model_len > 0 else None


@dataclass
class ServedModel:
    """What the request path needs to know about a model."""

    name: str
    tokenizer: TokenizerBundle
    token_texts: TokenTexts
    max_model_len: int | None


def tokenizer_max_len(bundle: TokenizerBundle) -> int | None:
    value = bundle.config.get("model_max_length")
    if isinstance(value, int | float) and 0 < value < _MAX_SANE_LEN:
        return int(value)
    return None


@dataclass
class ModelRegistry:
    js: JetStreamContext
    stale_after_s: float = 10.0
    workers: dict[str, WorkerEntry] = field(default_factory=dict)
    _tokenizers: dict[str, TokenizerBundle] = field(default_factory=dict)
    _texts: dict[str, TokenTexts] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _watch_task: asyncio.Task | None = None
    _watcher: Any = None
    _synced: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        kv: KeyValue = await self.js.key_value(WORKERS_BUCKET)
        self._watcher = await kv.watchall()
        self._watch_task = asyncio.create_task(self._watch(), name="registry-watch")
        try:
            await asyncio.wait_for(self._synced.wait(), timeout=5.0)
        except TimeoutError:
            log.warning("registry_initial_sync_slow")

    async def stop(self) -> None:
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception as e:  # connection may already be closed at shutdown
                log.debug("registry_watch_stop_failed", error=str(e))
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)

    async def _watch(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # end of the initial values
                self._synced.set()
                continue
            self.apply(entry.key, entry.value, entry.operation, entry.created)
            if entry.delta == 0:
                self._synced.set()

    def apply(self, key: str, value: bytes | None, operation: str | None, created) -> None:
        """Fold one KV update into the local view."""
        if operation in ("DEL", "PURGE") or not value:
            self.workers.pop(key, None)
            return
        try:
            status = decode_status(value)
        except MessageError as e:
            log.warning("bad_registry_entry", key=key, error=str(e))
            return
        age = 0.0
        if created is not None:
            age = max(0.0, time.time() - created.timestamp())
        self.workers[key] = WorkerEntry(key=key, status=status, seen=time.monotonic() - age)

    def live_workers(self, model: str | None = None) -> list[WorkerEntry]:
        cutoff = time.monotonic() - self.stale_after_s
        return [
            w
            for w in self.workers.values()
            if w.seen >= cutoff and (model is None or w.model == model)
        ]

    def models(self) -> list[str]:
        return sorted({w.model for w in self.live_workers()})

    def model_max_len(self, model: str) -> int | None:
        lens = [w.max_model_len for w in self.live_workers(model) if w.max_model_len]
        return min(lens) if lens else None

    async def get(self, model: str, require_live: bool = True) -> ServedModel | None:
        """The model if some worker serves it now (its tokenizer loaded once), else None.

        `require_live=False` (jobs API, re-attach): a model some worker served before is
        enough, since its tokenizer stays in the object store and a job queued for it
        runs when a worker comes back.
        """
        if require_live and not self.live_workers(model):
            return None
        bundle = self._tokenizers.get(model)
        if bundle is None:
            lock = self._locks.setdefault(model, asyncio.Lock())
            async with lock:
                bundle = self._tokenizers.get(model)
                if bundle is None:
                    try:
                        bundle = await self._load_tokenizer(model)
                    except ValueError:
                        if require_live:
                            raise
                        return None  # no worker ever published this model's tokenizer
                    self._tokenizers[model] = bundle
                    self._texts[model] = TokenTexts(bundle.tokenizer)
        max_len = self.model_max_len(model) or tokenizer_max_len(bundle)
        return ServedModel(model, bundle, self._texts[model], max_len)

    async def _load_tokenizer(self, model: str) -> TokenizerBundle:
        store = await self.js.object_store(MODELS_OBJECT_STORE)
        files: dict[str, bytes] = {}
        for name in TOKENIZER_FILES:
            try:
                result = await store.get(model_object_name(model, name))
            except (ObjectNotFoundError, NotFoundError):
                continue
            files[name] = result.data or b""
        # Parsing a large tokenizer.json takes a while: keep it off the event loop.
        return await asyncio.to_thread(load_tokenizer_files, files)
