"""Shared pieces of the fault tests: live Delta collectors, reference outputs, tallies.

Every fault test submits jobs, injects a fault into real processes, and then checks the
same two things: every submitted job completed, and every token expected was delivered
exactly once (nothing lost, nothing duplicated), with the text equal to an uninterrupted
in-process run for greedy and seeded sampling.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from engine_worker.engine.llm import LLM
from shared.messages import Delta, Job
from shared.sampling_params import SamplingParams
from tests.support.stack import BusClient, ServiceProcess


@dataclass
class Collector:
    """Reads one job's Deltas from LLM_EVENTS in the background, with arrival times."""

    job: Job
    deltas: list[Delta] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # monotonic arrival of each Delta
    task: asyncio.Task | None = None

    def start(self, bus: BusClient, timeout_s: float, past_errors: bool = False) -> Collector:
        async def run() -> None:
            async for d in bus.deltas(self.job.id, timeout_s, past_errors):
                self.deltas.append(d)
                self.times.append(time.monotonic())

        self.task = asyncio.create_task(run())
        return self

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for d in self.deltas for c in d.chunks)

    def tokens(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for d in self.deltas:
            for c in d.chunks:
                out.setdefault(c.index, []).extend(c.token_ids)
        return out

    def first_time_from(self, worker_prefix: str, after: float) -> float | None:
        for d, t in zip(self.deltas, self.times, strict=True):
            if t >= after and d.worker_id.startswith(worker_prefix):
                return t
        return None

    async def wait(self) -> None:
        assert self.task is not None
        await self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


def job_params(job: Job) -> SamplingParams:
    return SamplingParams(**vars(job.sampling))


def reference_outputs(model_dir: Path, jobs: list[Job]) -> dict[str, dict[int, list[int]]]:
    """What an uninterrupted in-process engine produces for each job (greedy/seeded)."""
    llm = LLM(str(model_dir))
    results = llm.generate([j.prompt_token_ids for j in jobs], [job_params(j) for j in jobs])
    return {
        job.id: {c.index: c.token_ids for c in res.outputs}
        for job, res in zip(jobs, results, strict=True)
    }


async def submit_watched(
    bus: BusClient,
    model_dir: Path,
    jobs: list[Job],
    timeout_s: float,
    send: Callable[[Job], Awaitable[None]] | None = None,
) -> tuple[dict[str, dict[int, list[int]]], list[Collector]]:
    """Each job's uninterrupted output (reference_outputs) and a Collector reading its
    Deltas, started before the job is sent: by `send`, else to the shared queue."""
    expected = reference_outputs(model_dir, jobs)
    collectors = [Collector(job).start(bus, timeout_s=timeout_s) for job in jobs]
    for job in jobs:
        await (send or bus.submit)(job)
    return expected, collectors


def worker_of(workers: list[ServiceProcess], worker_id: str) -> ServiceProcess | None:
    """The worker that wrote a Delta (its worker_id is the worker's name, '-', a suffix)."""
    return next((w for w in workers if worker_id.startswith(w.name + "-")), None)


@dataclass
class Tally:
    """Jobs submitted vs completed, tokens expected vs delivered, duplicates and gaps."""

    jobs_submitted: int = 0
    jobs_completed: int = 0
    tokens_expected: int = 0
    tokens_delivered: int = 0
    duplicate_seqs: int = 0
    seq_gaps: int = 0
    mismatched_jobs: list[str] = field(default_factory=list)

    @property
    def lost_jobs(self) -> int:
        return self.jobs_submitted - self.jobs_completed

    def add(self, deltas: list[Delta], expected: dict[int, list[int]], job_id: str) -> None:
        self.jobs_submitted += 1
        seqs = [d.seq for d in deltas]
        self.duplicate_seqs += len(seqs) - len(set(seqs))
        self.seq_gaps += sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
        if seqs and seqs[0] != 0:
            self.seq_gaps += 1
        got: dict[int, list[int]] = {}
        for d in deltas:
            for c in d.chunks:
                got.setdefault(c.index, []).extend(c.token_ids)
        finished = bool(deltas) and deltas[-1].finished and deltas[-1].error is None
        self.jobs_completed += int(finished)
        self.tokens_expected += sum(len(t) for t in expected.values())
        self.tokens_delivered += sum(len(t) for t in got.values())
        if {i: t for i, t in got.items() if t or i in expected} != expected:
            self.mismatched_jobs.append(job_id)

    def assert_exact(self) -> None:
        assert self.jobs_completed == self.jobs_submitted, self
        assert self.duplicate_seqs == 0 and self.seq_gaps == 0, self
        assert self.tokens_delivered == self.tokens_expected, self
        assert not self.mismatched_jobs, self

    def line(self) -> str:
        return (
            f"jobs {self.jobs_completed}/{self.jobs_submitted} completed, tokens "
            f"{self.tokens_delivered}/{self.tokens_expected} delivered, "
            f"duplicate seqs {self.duplicate_seqs}, gaps {self.seq_gaps}"
        )


def tally_of(collectors: list[Collector], expected: dict[str, dict[int, list[int]]]) -> Tally:
    tally = Tally()
    for c in collectors:
        tally.add(c.deltas, expected[c.job.id], c.job.id)
    return tally


@dataclass
class Takeover:
    """What a kill left behind: the jobs that started on the killed worker and finished
    on the survivor, the token tally of every job, and how long each taken-over job
    waited for the survivor's first token."""

    unfinished: list[Collector]
    tally: Tally
    recovery: list[float]


def takeover(
    collectors: list[Collector],
    expected: dict[str, dict[int, list[int]]],
    holder: str,
    survivor_prefix: str,
    killed_at: float,
) -> Takeover:
    unfinished = [
        c
        for c in collectors
        if c.deltas[0].worker_id == holder and c.deltas[-1].worker_id != holder
    ]
    tally = tally_of(collectors, expected)
    recovery = [c.first_time_from(survivor_prefix, killed_at) - killed_at for c in unfinished]
    return Takeover(unfinished, tally, recovery)


def report(name: str, text: str) -> None:
    """Counts and recovery times, for the closing note (visible with pytest -s)."""
    print(f"[fault] {name}: {text}")


# -- SSE over real HTTP ------------------------------------------------------------------
@dataclass
class SSEEvent:
    id: str | None
    data: str

    @property
    def payload(self) -> dict:
        return json.loads(self.data)


def parse_sse(text: str) -> list[SSEEvent]:
    events = []
    for block in text.split("\n\n"):
        eid, data = None, []
        for line in block.splitlines():
            if line.startswith("id: "):
                eid = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            events.append(SSEEvent(eid, "\n".join(data)))
    return events


@dataclass
class StreamRead:
    """What a client received on one SSE connection, even if it broke off."""

    events: list[SSEEvent] = field(default_factory=list)
    status: int = 0
    broken: bool = False  # the connection ended without `data: [DONE]`

    @property
    def last_id(self) -> str | None:
        ids = [e.id for e in self.events if e.id]
        return ids[-1] if ids else None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].data == "[DONE]"

    def texts(self, key: str = "text") -> dict[int, str]:
        """Concatenated text per choice (`text` for completions, chat delta `content`)."""
        out: dict[int, str] = {}
        for e in self.events:
            if e.data == "[DONE]":
                continue
            for c in e.payload.get("choices", []):
                piece = c.get("text") if key == "text" else (c.get("delta") or {}).get("content")
                out[c["index"]] = out.get(c["index"], "") + (piece or "")
        return out

    def finish_reasons(self) -> dict[int, str]:
        return {
            c["index"]: c["finish_reason"]
            for e in self.events
            if e.data != "[DONE]"
            for c in e.payload.get("choices", [])
            if c.get("finish_reason")
        }


async def read_stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    read: StreamRead,
    json_body: dict | None = None,
    headers: dict | None = None,
    hang_up_after: int | None = None,
) -> StreamRead:
    """Read an SSE response into `read` as it arrives (a broken connection is recorded);
    `hang_up_after`: the client closes the connection after that many events."""
    buffer = ""
    try:
        async with client.stream(method, url, json=json_body, headers=headers) as resp:
            read.status = resp.status_code
            async for chunk in resp.aiter_text():
                buffer += chunk
                *complete, buffer = buffer.split("\n\n")
                for block in complete:
                    read.events.extend(parse_sse(block + "\n\n"))
                if hang_up_after is not None and len(read.events) >= hang_up_after:
                    break
    except (httpx.HTTPError, OSError):
        read.broken = True
    read.broken = read.broken or not read.done
    return read
