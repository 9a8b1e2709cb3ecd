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
import typing
from dataclasses import fields
from typing import ClassVar, Literal

import nats

from services.api.gateway.key_store import all_records, keys_bucket, put_record, revoke
from services.api.gateway.keys import MAX_LIMIT, PRIORITY_CLASSES, KeyLimits, new_record
from shared.bus.nats_connect import CLI_CONNECT_TIMEOUT_S, NatsUnreachable, connect_nats, quiet
from shared.settings import BusSettings, Settings, add_flags, setting


class OutputOptions(Settings):
    section: ClassVar[str] = "output"

    as_json: bool = setting(False, env=None, flag="--json", help="machine-readable output")


class CreateOptions(Settings):
    section: ClassVar[str] = "create"

    name: str = setting(env=None, help="who or what the key is for")
    priority: Literal["interactive", "batch"] = setting(
        "interactive", env=None, help="scheduler class: interactive runs before batch"
    )
    requests_per_minute: int | None = setting(
        None, ge=1, le=MAX_LIMIT, env=None, flag="--rpm", help="requests per minute"
    )
    tokens_per_minute: int | None = setting(
        None,
        ge=1,
        le=MAX_LIMIT,
        env=None,
        flag="--tpm",
        help="prompt + completion tokens per minute",
    )
    max_tokens: int | None = setting(
        None, ge=1, le=MAX_LIMIT, env=None, help="cap on one request's completion tokens"
    )
    max_prompt_tokens: int | None = setting(
        None, ge=1, le=MAX_LIMIT, env=None, help="cap on one request's prompt tokens"
    )
    max_concurrent: int | None = setting(
        None, ge=1, le=MAX_LIMIT, env=None, help="open requests (streams included) per API replica"
    )
    operator: bool = setting(
        False, env=None, help="operator scope: may read and cancel every key's jobs"
    )


class RevokeOptions(Settings):
    section: ClassVar[str] = "revoke"

    key_id: str = setting(env=None, positional=True, help="id of the key to revoke")


LIMITS = tuple(f.name for f in fields(KeyLimits))
assert set(typing.get_args(CreateOptions.model_fields["priority"].annotation)) == set(
    PRIORITY_CLASSES
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Common flags before or after the action: every parser knows them.
    common = (OutputOptions, BusSettings)
    add_flags(parser, *common)
    sub = parser.add_subparsers(dest="action", required=True)
    add_flags(
        sub.add_parser("create", help="create a key and print its secret once"),
        CreateOptions,
        *common,
    )
    add_flags(
        sub.add_parser("revoke", help="revoke a key by id (stops working within seconds)"),
        RevokeOptions,
        *common,
    )
    add_flags(sub.add_parser("list", help="list keys (ids, names, limits; never secrets)"), *common)


async def _run(args: argparse.Namespace) -> int:
    settings = BusSettings.from_args(args)
    as_json = OutputOptions.from_args(args).as_json
    create = CreateOptions.from_args(args) if args.action == "create" else None
    revoke_id = RevokeOptions.from_args(args).key_id if args.action == "revoke" else ""
    nc = await connect_nats(
        settings.nats_url, "jetserve-keys", CLI_CONNECT_TIMEOUT_S, quiet, identity=settings
    )
    try:
        kv = await keys_bucket(nc.jetstream(), settings.stream_replicas)
        if create is not None:
            limits = KeyLimits.from_dict(
                {f: getattr(create, f) for f in LIMITS if getattr(create, f) is not None}
            )
            secret, record = new_record(create.name, limits, create.priority, create.operator)
            await put_record(kv, record)
            if as_json:
                print(json.dumps({"id": record.id, "name": record.name, "key": secret}))
            else:
                print(f"created {record.id} ({record.name}); the key, shown only now:\n{secret}")
            return 0
        if args.action == "revoke":
            record = await revoke(kv, revoke_id)
            if record is None:
                print(f"no key with id {revoke_id}", file=sys.stderr)
                return 1
            print(
                json.dumps({"id": record.id, "revoked": True})
                if as_json
                else f"revoked {record.id}"
            )
            return 0
        records = await all_records(kv)
        if as_json:
            print(json.dumps([_public(r) for r in records]))
        elif not records:
            print("no API keys (create one with `jetserve keys create --name NAME`)")
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
        "operator": record.operator,
        "created_at": record.created_at,
        "limits": {k: v for k, v in vars(record.limits).items() if v is not None},
    }


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except NatsUnreachable as e:
        print(f"jetserve keys: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad limit value
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, nats.errors.Error, TimeoutError) as e:  # NATS unreachable or refused us
        print(f"jetserve keys: {type(e).__name__}: {e} (a NATS identity with access to the "
              "keys: JETSERVE_NATS_USER, JETSERVE_NATS_PASSWORD_FILE)", file=sys.stderr)  # fmt: skip
        return 2
