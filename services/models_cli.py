"""`jetserve models push PATH --name NAME | list | rm NAME`: models in the NATS object store.

A pushed model is served by `jetserve worker --model NAME` on any machine that reaches
NATS: the worker fetches and verifies it (shared/bus/model_store.py), so workers need no
shared model volume.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import nats

from shared.bus.model_store import ModelStoreError, list_models, push, remove
from shared.bus.nats_connect import CLI_CONNECT_TIMEOUT_S, NatsUnreachable, connect_nats, quiet
from shared.bus.subjects import sanitize_model
from shared.settings import BusSettings, add_flags
from shared.terminal import ByteProgress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, BusSettings)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("push", help="store a model folder (weights, config, tokenizer)")
    p.add_argument("path", help="the Hugging Face model folder")
    p.add_argument("--name", help="the model's name (default: the folder's name)")
    add_flags(p, BusSettings)
    p = sub.add_parser("list", help="list stored models")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_flags(p, BusSettings)
    p = sub.add_parser("rm", help="remove a stored model")
    p.add_argument("name")
    add_flags(p, BusSettings)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _folder_name(path: Path) -> str:
    return path.resolve().name


async def _push(js, settings: BusSettings, path: Path, name: str) -> int:
    sanitize_model(name)  # an empty name is an error before anything is sent
    bar = ByteProgress.start(_folder_bytes(path), f"pushing {name}")
    try:
        manifest = await push(js, path, name, bar.update, settings.stream_replicas)
    finally:
        bar.close()
    print(f"pushed {name}: {len(manifest.files)} files, {_size(manifest.total_bytes)}, "
          f"digest {manifest.digest[:16]}")  # fmt: skip
    return 0


async def _list(js, as_json: bool) -> int:
    for m in await list_models(js):
        if as_json:
            print(json.dumps({"name": m.name, "files": len(m.files), "bytes": m.total_bytes,
                              "digest": m.digest, "created_at": m.created_at}))  # fmt: skip
        else:
            when = datetime.fromtimestamp(m.created_at, UTC).strftime("%Y-%m-%d %H:%M")
            print(f"{m.name}\t{_size(m.total_bytes)}\t{len(m.files)} files\t"
                  f"{m.digest[:12]}\t{when}")  # fmt: skip
    return 0


async def main(args: argparse.Namespace) -> int:
    settings = BusSettings.from_args(args)
    nc = await connect_nats(
        settings.nats_url, "jetserve-models", CLI_CONNECT_TIMEOUT_S, quiet, identity=settings
    )
    try:
        js = nc.jetstream()
        if args.action == "push":
            path = Path(args.path)
            return await _push(js, settings, path, args.name or _folder_name(path))
        if args.action == "list":
            return await _list(js, args.json)
        manifest = await remove(js, args.name)
        print(f"removed {manifest.name} ({len(manifest.files)} files)")
        return 0
    finally:
        await nc.close()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(main(args))
    except (ModelStoreError, NatsUnreachable) as e:
        print(f"jetserve models: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, nats.errors.Error, TimeoutError) as e:
        print(f"jetserve models: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
