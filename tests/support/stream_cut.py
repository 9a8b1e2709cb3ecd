"""Streams cut by a fault on one API replica and re-attached through another.

The API fault tests (kill -9, a SIGTERM drain with a re-attach grace, ...) all open
seeded completion streams on one replica, inject the fault once every stream has sent a
few events, re-attach the cut ones through another replica with `Last-Event-ID`, and
compare what each client got in total with an uninterrupted run of the same requests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx

from tests.support.faults import StreamRead, read_stream
from tests.support.polling import wait_for

PROMPTS = ["The quick brown fox", "Workers pull jobs", "Paged attention", "A queue of jobs"]


def body(model: str, i: int, max_tokens: int, stream: bool = True) -> dict:
    """The i-th seeded completion request (greedy for even i, sampled for odd i)."""
    return {
        "model": model,
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0.0 if i % 2 == 0 else 0.8,
        "seed": 1000 + i,
        "ignore_eos": True,
        "stream": stream,
    }


async def references(api_url: str, bodies: list[dict]) -> list[str]:
    """The uninterrupted run: the same seeded requests, non-streaming."""
    async with httpx.AsyncClient(base_url=api_url, timeout=120) as api:
        outs = await asyncio.gather(
            *(api.post("/v1/completions", json={**b, "stream": False}) for b in bodies)
        )
    return [o.json()["choices"][0]["text"] for o in outs]


def tally_line(reads: list[StreamRead], refs: list[str]) -> tuple[str, int, int]:
    """(report line, streams completed with `length`, texts equal to the reference)."""
    completed = sum(r.done and r.finish_reasons() == {0: "length"} for r in reads)
    exact = sum(r.texts().get(0, "") == ref for r, ref in zip(reads, refs, strict=True))
    chars = sum(len(r.texts().get(0, "")) for r in reads)
    line = (
        f"jobs {completed}/{len(reads)} completed, {exact}/{len(reads)} texts equal to the "
        f"uninterrupted run, chars {chars}/{sum(len(x) for x in refs)} delivered"
    )
    return line, completed, exact


@dataclass
class CutStreams:
    """Completion streams opened on one replica; `rests` are their re-attached tails."""

    http: httpx.AsyncClient
    bodies: list[dict]
    reads: list[StreamRead]
    tasks: list[asyncio.Task]
    rests: list[StreamRead] = field(default_factory=list)

    @classmethod
    async def open(
        cls, http: httpx.AsyncClient, api_url: str, bodies: list[dict], min_events: int = 5
    ) -> CutStreams:
        """Start one stream per body and return once each has sent `min_events` events
        (the moment to inject the fault: every job is mid-way)."""
        reads = [StreamRead() for _ in bodies]
        tasks = [
            asyncio.create_task(read_stream(http, "POST", f"{api_url}/v1/completions", r, b))
            for r, b in zip(reads, bodies, strict=True)
        ]
        await wait_for(lambda: all(len(r.events) >= min_events for r in reads), timeout_s=60)
        return cls(http, bodies, reads, tasks)

    async def ended(self) -> list[bool]:
        """Wait until every first connection has ended; which of them were cut."""
        await asyncio.gather(*self.tasks)
        return [r.broken for r in self.reads]

    async def reattach(self, api_url: str) -> None:
        """Each cut stream reconnects to `api_url` with the last event id it saw (a stream
        that finished before the fault needs nothing: its tail stays empty)."""
        self.rests = [StreamRead() for _ in self.reads]
        await asyncio.gather(
            *(
                read_stream(
                    self.http,
                    "POST",
                    f"{api_url}/v1/completions",
                    rest,
                    b,
                    headers={"Last-Event-ID": r.last_id},
                )
                for r, rest, b in zip(self.reads, self.rests, self.bodies, strict=True)
                if r.broken
            )
        )

    def joined(self) -> list[StreamRead]:
        """What each client received over both connections."""
        rests = self.rests or [StreamRead() for _ in self.reads]
        return [
            StreamRead(events=r.events + x.events) for r, x in zip(self.reads, rests, strict=True)
        ]
