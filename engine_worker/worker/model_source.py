"""Where a worker's model folder comes from: a local path, NATS, or the Hugging Face hub.

`--model NAME` that is not a folder names a model pushed with `jetserve models push`: it
is fetched once into `--model-cache` (a progress bar on a terminal), verified file by
file against its manifest (shared/bus/model_store.py), and served under NAME. A NAME that is
neither a folder nor stored, shaped `org/name`, is a Hugging Face hub id, downloaded with
huggingface_hub (shared/hub.py). Runs before the worker starts, on its own short NATS
connection, so the worker proper always sees a verified local folder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats

from shared.bus.model_store import Manifest, ModelStoreError, fetch, get_manifest
from shared.bus.nats_connect import connect_options
from shared.hub import download, is_hub_id
from shared.logging import get_logger
from shared.settings import WorkerSettings
from shared.terminal import ByteProgress

log = get_logger("engine_worker.model_source")
CONNECT_TIMEOUT_S = 30.0


def is_local_folder(model: str) -> bool:
    return expanded(model).is_dir()


def expanded(path: str) -> Path:
    return Path(path).expanduser()


async def resolve_model(settings: WorkerSettings) -> WorkerSettings:
    """Settings whose `model` is a verified local folder (an error if none can be had)."""
    if is_local_folder(settings.model):
        return settings
    name = settings.model
    folder = await _from_store(settings)
    if folder is None:
        if name.startswith(("/", "./", "../", "~")):
            raise ModelStoreError(f"model folder {name!r} does not exist")
        if not is_hub_id(name):
            raise ModelStoreError(
                f"model {name!r} is neither a local folder, nor in the object store (store "
                f"it with `jetserve models push PATH --name {name}`), nor a hub id (org/name)"
            )
        folder = await _from_hub(settings)
    update = {"model": str(folder), "model_name": settings.model_name or name}
    return settings.model_copy(update=update)


async def _from_store(settings: WorkerSettings) -> Path | None:
    """The verified folder of a model pushed to NATS; None when no such model is stored."""
    name = settings.model
    nc = await nats.connect(
        settings.nats_url,
        name=f"jetserve-worker-fetch-{settings.worker_id}",
        connect_timeout=CONNECT_TIMEOUT_S,
        **connect_options(settings),  # its identity and TLS, like its main connection
    )
    bar = ByteProgress()

    def started(manifest: Manifest) -> None:
        nonlocal bar
        log.info("model_fetch_started", model=name, files=len(manifest.files),
                 bytes=manifest.total_bytes, digest=manifest.digest[:16])  # fmt: skip
        bar = ByteProgress.start(manifest.total_bytes, f"fetching {name}")

    try:
        js = nc.jetstream()
        if await get_manifest(js, name) is None:
            return None
        cache = expanded(settings.model_cache)
        folder = await fetch(js, name, cache, lambda n: bar.update(n), started)
    finally:
        bar.close()
        await nc.close()
    log.info("model_ready", model=name, folder=str(folder), source="nats")
    return folder


async def _from_hub(settings: WorkerSettings) -> Path:
    name, revision = settings.model, settings.model_revision
    log.info("model_download_started", model=name, revision=revision or "main")
    cache = expanded(settings.model_cache) / "hub"
    folder = await asyncio.to_thread(download, name, revision, cache)
    log.info("model_ready", model=name, folder=str(folder), source="hub")
    return folder
