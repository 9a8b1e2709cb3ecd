"""`jetserve keys create|revoke|list`: manage API keys in NATS, no API restart needed.

Every API replica watches the `llm_api_keys` bucket, so a created key works and a
revoked key stops working on all of them within moments. The secret is printed once at
creation and never stored; only its SHA-256 is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import nats

from services.api.gateway.key_store import all_records, keys_bucket, put_record, revoke
from services.api.gateway.keys import PRIORITY_CLASSES, KeyLimits, new_record
from shared.settings import BusSettings

LIMIT_FLAGS = {
    "requests_per_minute": "--rpm",
    "tokens_per_minute": "--tpm",
    "max_tokens": "--max-tokens",
    "max_prompt_tokens": "--max-prompt-tokens",
    "max_concurrent": "--max-concurrent",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", help="NATS server URL [env JETSERVE_NATS_URL]")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create a key and print its secret once")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--priority", choices=sorted(PRIORITY_CLASSES), default="interactive",
        help="scheduler class: interactive runs before batch",
    )  # fmt: skip
    for field_name, flag in LIMIT_FLAGS.items():
        create.add_argument(flag, dest=field_name, type=int, help=field_name.replace("_", " "))
    rev = sub.add_parser("revoke", help="revoke a key by id (stops working within seconds)")
    rev.add_argument("key_id")
    sub.add_parser("list", help="list keys (ids, names, limits; never secrets)")


async def _run(args: argparse.Namespace) -> int:
    settings = BusSettings.from_env()
    nc = await nats.connect(args.nats_url or settings.nats_url, connect_timeout=5)
    try:
        kv = await keys_bucket(nc.jetstream(), settings.stream_replicas)
        if args.action == "create":
            limits = KeyLimits.from_dict(
                {f: getattr(args, f) for f in LIMIT_FLAGS if getattr(args, f) is not None}
            )
            secret, record = new_record(args.name, limits, args.priority)
            await put_record(kv, record)
            if args.json:
                print(json.dumps({"id": record.id, "name": record.name, "key": secret}))
            else:
                print(f"created {record.id} ({record.name}); the key, shown only now:\n{secret}")
            return 0
        if args.action == "revoke":
            record = await revoke(kv, args.key_id)
            if record is None:
                print(f"no key with id {args.key_id}", file=sys.stderr)
                return 1
            print(
                json.dumps({"id": record.id, "revoked": True})
                if args.json
                else f"revoked {record.id}"
            )
            return 0
        records = await all_records(kv)
        if args.json:
            print(json.dumps([_public(r) for r in records]))
        else:
            for r in records:
                state = "revoked" if r.revoked else "active"
                limits = {k: v for k, v in vars(r.limits).items() if v is not None}
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.created_at))
                print(f"{r.id}  {state:8}  {r.priority_class:11}  {created}  {r.name}  {limits}")
        return 0
    finally:
        await nc.close()


def _public(record) -> dict:
    return {
        "id": record.id,
        "name": record.name,
        "priority_class": record.priority_class,
        "revoked": record.revoked,
        "created_at": record.created_at,
        "limits": {k: v for k, v in vars(record.limits).items() if v is not None},
    }


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except ValueError as e:  # a bad limit value
        print(f"error: {e}", file=sys.stderr)
        return 2
