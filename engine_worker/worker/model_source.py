"""Where a worker's model folder comes from: a local path, or the NATS object store.

`--model NAME` that is not a folder names a model pushed with `jetserve models push`: it
is fetched once into `--model-cache` (a progress bar on a terminal), verified file by
file against its manifest (shared/model_store.py), and served under NAME. Runs before
the worker starts, on its own short NATS connection, so the worker proper always sees a
verified local folder.
"""

from __future__ import annotations

from pathlib import Path

import nats

from shared.logging import get_logger
from shared.model_store import Manifest, fetch
from shared.progress import ByteProgress
from shared.settings import WorkerSettings

log = get_logger("engine_worker.model_source")
CONNECT_TIMEOUT_S = 30.0


def is_local_folder(model: str) -> bool:
    return expanded(model).is_dir()


def expanded(path: str) -> Path:
    return Path(path).expanduser()


async def resolve_model(settings: WorkerSettings) -> WorkerSettings:
    """Settings whose `model` is a verified local folder (ModelStoreError if none can be had)."""
    if is_local_folder(settings.model):
        return settings
    name = settings.model
    nc = await nats.connect(
        settings.nats_url,
        name=f"jetserve-worker-fetch-{settings.worker_id}",
        connect_timeout=CONNECT_TIMEOUT_S,
    )
    bar = ByteProgress()

    def started(manifest: Manifest) -> None:
        nonlocal bar
        log.info("model_fetch_started", model=name, files=len(manifest.files),
                 bytes=manifest.total_bytes, digest=manifest.digest[:16])  # fmt: skip
        bar = ByteProgress.start(manifest.total_bytes, f"fetching {name}")

    try:
        cache = expanded(settings.model_cache)
        folder = await fetch(nc.jetstream(), name, cache, lambda n: bar.update(n), started)
    finally:
        bar.close()
        await nc.close()
    log.info("model_ready", model=name, folder=str(folder))
    return settings.model_copy(
        update={"model": str(folder), "model_name": settings.model_name or name}
    )
