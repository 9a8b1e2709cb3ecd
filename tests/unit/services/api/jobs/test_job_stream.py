"""A followed job's Deltas as the request's task reads them: in order, deduplicated, and
coalesced only when the reader is behind (what arrived while it was busy comes at once)."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given
from hypothesis import strategies as st

from services.api.jobs.client import JobClient, JobStream
from shared.messages import CompletionChunk, Delta, Job
from shared.sampling_params import SamplingParams


class NoNats(JobClient):
    """A JobClient whose catch-up only records that the log would be read."""

    def __init__(self) -> None:
        self.caught_up: list[str] = []
        self._following, self._live = {}, {}

    def catch_up(self, stream: JobStream) -> None:
        self.caught_up.append(stream.job.id)
        stream.live = False


def job() -> Job:
    return Job("j", "m", [1], SamplingParams(max_tokens=8), time.time(), "llm.steps.r")


def delta(seq: int, finished: bool = False) -> Delta:
    return Delta("j", seq, [CompletionChunk(0, [100 + seq])], finished)


async def read_all(stream: JobStream) -> list[list[int]]:
    return [[d.seq for d in batch] async for batch in stream.batches()]


async def test_a_reader_that_keeps_up_gets_each_delta_at_once() -> None:
    stream = JobStream(NoNats(), job(), None, live=True)
    got: list[list[int]] = []

    async def reader() -> None:
        async for batch in stream.batches():
            got.append([d.seq for d in batch])

    task = asyncio.create_task(reader())
    for seq in range(4):
        await asyncio.sleep(0.01)
        stream.push(delta(seq, seq == 3), True)
        await asyncio.sleep(0)  # one loop turn: the reader has it, nothing waits for more
        assert got[-1] == [seq]
    await asyncio.wait_for(task, 1)
    assert got == [[0], [1], [2], [3]]


async def test_what_arrives_while_the_reader_is_busy_comes_as_one_batch() -> None:
    stream = JobStream(NoNats(), job(), None, live=True)
    for seq in range(5):
        stream.push(delta(seq, seq == 4), True)
    assert await read_all(stream) == [[0, 1, 2, 3, 4]]


@given(st.lists(st.integers(0, 9), max_size=30))
def test_order_duplicates_and_gaps(arrivals: list[int]) -> None:
    """Live Deltas in any arrival order: each seq at most once, in order; the first one
    that skips ahead switches the stream to the log, which delivers from the first."""
    expected, nxt, gap = [], 0, False
    for seq in arrivals:
        if seq == nxt:
            expected.append(seq)
            nxt += 1
        elif seq > nxt:
            gap = True
            break
    client = NoNats()
    stream = JobStream(client, job(), None, live=True)
    for seq in arrivals:
        stream.push(delta(seq), True)
    if gap:
        for seq in range(nxt + 2):  # the log: everything stored, from the first
            stream.push(delta(seq, seq == nxt + 1), False)
        stream.push(delta(nxt + 2, True), True)  # live, after the switch: ignored
        expected += [nxt, nxt + 1]
    else:
        stream.push(delta(nxt, True), True)
        expected.append(nxt)
    seqs = [s for batch in asyncio.run(read_all(stream)) for s in batch]
    assert seqs == expected
    assert client.caught_up == (["j"] if gap else [])
