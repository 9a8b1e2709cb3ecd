"""Checkpoint folders in the JetStream object store: push, list, remove, fetch into a cache.

A pushed model is its files, each an object `<model>/<path>` (JetStream chunks it, 128 KiB
per message, with a SHA-256 digest over the chunks), plus `<model>/manifest.json`
listing every file's path, size and sha256, written last so a push that died half way is
never listed or fetched. A worker started with `--model NAME` that is not a local folder
fetches the files into `<cache>/<model>/<digest>/`, checks each file's size and sha256
against the manifest, and only then renames the folder into place; a later start finds
the verified copy and skips the download. Any mismatch (a corrupted chunk, a truncated
object) is a `ModelStoreError` naming the file, never a model loaded from bad bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig
from nats.js.errors import BadRequestError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from shared.bus.subjects import CHECKPOINTS_OBJECT_STORE, sanitize_model

MANIFEST = "manifest.json"
VERIFIED_MARKER = ".jetserve-verified"
HASH_BLOCK = 1 << 20

Progress = Callable[[int], None]  # bytes just moved


class ModelStoreError(Exception):
    """A model that is missing from the store, or whose bytes do not verify."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    size: int
    sha256: str


@dataclass
class Manifest:
    name: str
    files: list[FileEntry]
    created_at: float = field(default_factory=time.time)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        """sha256 over the file list: names this exact checkpoint (the cache folder)."""
        lines = "".join(f"{f.path}\0{f.size}\0{f.sha256}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "created_at": self.created_at,
                           "files": [asdict(f) for f in self.files]}).encode()  # fmt: skip

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
            files = [
                FileEntry(safe_path(f["path"]), int(f["size"]), str(f["sha256"]))
                for f in raw["files"]
            ]
            return cls(str(raw["name"]), files, float(raw.get("created_at", 0.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise ModelStoreError(f"the model's manifest is malformed: {e}") from e


def safe_path(path: str) -> str:
    """A manifest path must stay inside the model folder (no absolute paths, no '..')."""
    p = PurePosixPath(path)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        raise ValueError(f"unsafe path in manifest: {path!r}")
    return str(p)


def object_name(model: str, path: str) -> str:
    return f"{sanitize_model(model)}/{path}"


async def checkpoint_store(js: JetStreamContext, replicas: int = 1) -> ObjectStore:
    try:
        return await js.object_store(CHECKPOINTS_OBJECT_STORE)
    except (NotFoundError, BadRequestError):
        return await js.create_object_store(
            CHECKPOINTS_OBJECT_STORE, config=ObjectStoreConfig(replicas=replicas)
        )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder, hidden files and folders left out."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(path)
    return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The files to push; ModelStoreError unless it is a Hugging Face model folder."""
    if not folder.is_dir():
        raise ModelStoreError(f"{folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelStoreError(f"{folder} has no config.json: not a Hugging Face model folder")
    return folder_files(folder)


def open_file(path: Path, mode: str) -> Any:
    """Local file I/O is short next to the network transfer it feeds; parents are made."""
    if "w" in mode:
        path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, mode)


class _CountingReader:
    """A file the object store reads in chunks, reporting each chunk's size."""

    def __init__(self, f: Any, progress: Progress | None) -> None:
        self.f, self.progress = f, progress

    def readinto(self, buf: Any) -> int:
        n = self.f.readinto(buf)
        if n and self.progress is not None:
            self.progress(n)
        return n


class _CountingWriter:
    """What the object store writes a fetched object into: a file, hashed as it goes."""

    def __init__(self, f: Any, progress: Progress | None) -> None:
        self.f, self.progress = f, progress
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.progress is not None:
            self.progress(len(data))
        return self.f.write(data)


async def push(
    js: JetStreamContext,
    folder: Path,
    name: str,
    progress: Progress | None = None,
    replicas: int = 1,
) -> Manifest:
    """Store a checkpoint folder under `name` (replacing an earlier push of that name)."""
    paths = checkpoint_files(folder)
    store = await checkpoint_store(js, replicas)
    entries = []
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        digest = await asyncio.to_thread(file_sha256, path)
        with open_file(path, "rb") as f:
            await store.put(object_name(name, rel), _CountingReader(f, progress))  # type: ignore[arg-type]
        entries.append(FileEntry(rel, path.stat().st_size, digest))
    manifest = Manifest(name, entries)
    old = await get_manifest(js, name)
    await store.put(object_name(name, MANIFEST), manifest.to_json())
    if old is not None:  # files of the earlier push that this one no longer has
        for gone in {f.path for f in old.files} - {f.path for f in entries}:
            await _delete(store, object_name(name, gone))
    return manifest


async def get_manifest(js: JetStreamContext, name: str) -> Manifest | None:
    store = await checkpoint_store(js)
    try:
        result = await store.get(object_name(name, MANIFEST))
    except (ObjectNotFoundError, NotFoundError):
        return None
    return Manifest.from_json(result.data or b"")


async def list_models(js: JetStreamContext) -> list[Manifest]:
    store = await checkpoint_store(js)
    try:
        infos = await store.list()
    except NotFoundError:
        return []
    out = []
    for info in infos:
        if info.name.endswith("/" + MANIFEST) and not info.deleted:
            manifest = await get_manifest(js, info.name.removesuffix("/" + MANIFEST))
            if manifest is not None:
                out.append(manifest)
    return sorted(out, key=lambda m: m.name)


async def _delete(store: ObjectStore, name: str) -> None:
    try:
        await store.delete(name)
    except (ObjectNotFoundError, NotFoundError):
        pass


async def remove(js: JetStreamContext, name: str) -> Manifest:
    manifest = await get_manifest(js, name)
    if manifest is None:
        raise ModelStoreError(f"model {name!r} is not in the object store")
    store = await checkpoint_store(js)
    await _delete(store, object_name(name, MANIFEST))  # first: nobody fetches it any more
    for f in manifest.files:
        await _delete(store, object_name(name, f.path))
    return manifest


def cached_copy(cache_root: Path, manifest: Manifest) -> Path:
    return cache_root / sanitize_model(manifest.name) / manifest.digest[:16]


def is_verified(folder: Path, manifest: Manifest) -> bool:
    marker = folder / VERIFIED_MARKER
    return marker.is_file() and marker.read_text().strip() == manifest.digest


async def fetch(
    js: JetStreamContext,
    name: str,
    cache_root: Path,
    progress: Progress | None = None,
    on_manifest: Callable[[Manifest], None] | None = None,
) -> Path:
    """The model's verified local folder, downloaded from the store when not cached."""
    manifest = await get_manifest(js, name)
    if manifest is None:
        raise ModelStoreError(
            f"model {name!r} is neither a local folder nor in the object store "
            f"(store it with `jetserve models push PATH --name {name}`)"
        )
    target = cached_copy(cache_root, manifest)
    if is_verified(target, manifest):
        return target
    if on_manifest is not None:
        on_manifest(manifest)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        await _download(js, manifest, partial, progress)
        (partial / VERIFIED_MARKER).write_text(manifest.digest)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


async def _download(
    js: JetStreamContext, manifest: Manifest, into: Path, progress: Progress | None
) -> None:
    from nats.js.errors import DigestMismatchError

    store = await checkpoint_store(js)
    for entry in manifest.files:
        dest = into / entry.path
        with open_file(dest, "wb") as f:
            writer = _CountingWriter(f, progress)
            try:
                await store.get(object_name(manifest.name, entry.path), writeinto=writer)  # type: ignore[arg-type]
            except DigestMismatchError as e:
                raise ModelStoreError(
                    f"{manifest.name}/{entry.path}: corrupted in the object store (its chunks "
                    "do not match the stored SHA-256 digest); push the model again"
                ) from e
            except (ObjectNotFoundError, NotFoundError) as e:
                raise ModelStoreError(
                    f"{manifest.name}/{entry.path} is listed in the manifest but missing "
                    "from the object store; push the model again"
                ) from e
        if writer.size != entry.size or writer.sha.hexdigest() != entry.sha256:
            raise ModelStoreError(
                f"{manifest.name}/{entry.path}: got {writer.size} bytes with sha256 "
                f"{writer.sha.hexdigest()[:16]}..., the manifest says {entry.size} bytes with "
                f"{entry.sha256[:16]}...; push the model again"
            )
