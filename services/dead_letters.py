"""`jetserve dead`: list the jobs in LLM_DEAD and replay them once the cause is fixed.

`jetserve dead list` shows each dead job with why it was given up and how far it got;
`jetserve dead replay --id ID` (repeatable) or `--all` queues them again under their own
ids. A replayed job continues after the tokens it had already produced, and clients
that re-attach to it (Last-Event-ID, or the jobs API) see it run to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from typing import ClassVar

import nats
from pydantic import model_validator

from shared.bus.dead_letters import DeadLetter, list_dead_letters, replay
from shared.bus.jetstream import ensure_streams
from shared.bus.job_events import read_history
from shared.bus.nats_connect import CLI_CONNECT_TIMEOUT_S, NatsUnreachable, connect_nats, quiet
from shared.settings import BusSettings, Settings, add_flags, setting


class ListOptions(Settings):
    section: ClassVar[str] = "list"

    as_json: bool = setting(False, env=None, flag="--json", help="one JSON object per line")


class ReplayOptions(Settings):
    section: ClassVar[str] = "replay"

    ids: list[str] = setting([], env=None, flag="--id", help="job id to replay (repeatable)")
    replay_all: bool = setting(False, env=None, flag="--all", help="every dead-lettered job")

    @model_validator(mode="after")
    def _one_choice(self) -> ReplayOptions:
        if bool(self.ids) == self.replay_all:
            raise ValueError("give --id ID (repeatable) or --all, not both and not neither")
        return self


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Bus flags before or after the action: both parsers know them.
    add_flags(parser, BusSettings)
    sub = parser.add_subparsers(dest="action", required=True)
    add_flags(sub.add_parser("list", help="list dead-lettered jobs"), ListOptions, BusSettings)
    add_flags(
        sub.add_parser("replay", help="queue dead-lettered jobs again"), ReplayOptions, BusSettings
    )


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else "-"


async def _list(js, as_json: bool) -> int:
    letters = await list_dead_letters(js)
    rows = []
    for letter in letters:
        history = await read_history(js, letter.job_id) if letter.job_id else None
        rows.append(
            {
                "job_id": letter.job_id,
                "model": letter.model,
                "deliveries": letter.deliveries,
                "dead_at": _when(letter.dead_at),
                "tokens_produced": history.num_tokens if history else 0,
                "worker": letter.worker_id,
                "reason": letter.reason,
            }
        )
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print("no dead-lettered jobs")
        return 0
    print(f"{'JOB ID':34} {'MODEL':20} {'DELIV':>5} {'TOKENS':>6}  {'DEAD AT':20}  REASON")
    for r in rows:
        print(
            f"{r['job_id']:34} {r['model'][:20]:20} {r['deliveries']:>5} "
            f"{r['tokens_produced']:>6}  {r['dead_at']:20}  {r['reason']}"
        )
    return 0


async def _replay(js, ids: list[str] | None) -> int:
    letters = await list_dead_letters(js)
    chosen: list[DeadLetter] = (
        letters if ids is None else [x for x in letters if x.job_id in set(ids)]
    )
    missing = sorted(set(ids or []) - {x.job_id for x in chosen})
    for letter in chosen:
        await replay(js, letter)
        print(f"replayed {letter.job_id} ({letter.model})")
    for job_id in missing:
        print(f"not in the dead-letter stream: {job_id}", file=sys.stderr)
    if not chosen and not missing:
        print("no dead-lettered jobs")
    return 1 if missing else 0


async def main(args: argparse.Namespace) -> int:
    settings = BusSettings.from_args(args)
    if args.action == "replay":
        ReplayOptions.from_args(args)  # a bad choice is reported before connecting

    nc = await connect_nats(
        settings.nats_url, "jetserve-dead", CLI_CONNECT_TIMEOUT_S, quiet, identity=settings
    )
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        if args.action == "list":
            return await _list(js, ListOptions.from_args(args).as_json)
        replay_opts = ReplayOptions.from_args(args)
        return await _replay(js, None if replay_opts.replay_all else replay_opts.ids)
    finally:
        await nc.close()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(main(args))
    except NatsUnreachable as e:
        print(f"jetserve dead: {e}", file=sys.stderr)
        return 2
    except (OSError, nats.errors.Error, TimeoutError) as e:
        print(f"jetserve dead: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
