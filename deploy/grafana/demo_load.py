"""A bounded, bursty chat load against a local jetserve API, so the dashboard has a story.

Phases of rising then falling concurrency show queueing (queue depth, TTFT) and recovery;
a few shared system prompts give the prefix cache something to hit. Every loop is
bounded in time and request count, and it talks only to the URL given (loopback by
default).

    python deploy/grafana/demo_load.py --model jetserve-demo --phase-seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

SYSTEM_PROMPTS = [
    "You are a concise assistant for a serving system. Answer in one short paragraph "
    "and prefer plain words over jargon, because operators read this at night.",
    "You are a storyteller. Continue the story with a calm voice, short sentences and "
    "one surprising detail in every paragraph, and never end on a question.",
    "You translate questions about queues, caches and batches into everyday examples "
    "from a kitchen, a library or a train station, keeping each example short.",
]
QUESTIONS = [
    "Why does a queue grow when the workers are full?",
    "What is a key value cache?",
    "Tell me about the river bank at dawn.",
    "How does continuous batching help?",
    "What happens when a node of the cluster fails?",
    "Describe a fox that learned to count.",
    "Why would time to first token rise?",
    "What is a prefix cache hit?",
]
# (concurrency, share of the phase length): up, peak, down, idle tail.
PHASES = [(2, 1.0), (6, 1.0), (16, 1.0), (32, 1.0), (6, 1.0), (1, 1.0)]
MAX_REQUESTS = 20000


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)


async def one_request(
    client: httpx.AsyncClient, model: str, rng: random.Random, tally: Tally
) -> None:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
            {"role": "user", "content": rng.choice(QUESTIONS)},
        ],
        "max_tokens": rng.randint(16, 96),
        "temperature": 0.8,
    }
    started = time.monotonic()
    try:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        tally.ok += 1
        tally.latencies.append(time.monotonic() - started)
    except httpx.HTTPError:
        tally.failed += 1


async def phase(
    client: httpx.AsyncClient,
    model: str,
    concurrency: int,
    seconds: float,
    seed: int,
    tally: Tally,
) -> None:
    deadline = time.monotonic() + seconds

    async def user(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline and tally.ok + tally.failed < MAX_REQUESTS:
            await one_request(client, model, rng, tally)

    await asyncio.gather(*(user(i) for i in range(concurrency)))


async def run(base_url: str, model: str, phase_seconds: float) -> Tally:
    tally = Tally()
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        for seed, (concurrency, share) in enumerate(PHASES):
            before = tally.ok
            await phase(client, model, concurrency, phase_seconds * share, seed, tally)
            print(
                f"concurrency {concurrency:>3}: {tally.ok - before} requests "
                f"({tally.failed} failed so far)",
                flush=True,
            )
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="jetserve-demo")
    p.add_argument("--phase-seconds", type=float, default=60.0)
    args = p.parse_args(argv)
    tally = asyncio.run(run(args.base_url, args.model, args.phase_seconds))
    print(f"{tally.ok} ok, {tally.failed} failed")
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
