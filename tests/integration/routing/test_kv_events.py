"""Workers announce their KV blocks over NATS; an API-side index follows them and
recovers from a snapshot after missing events (real nats-server, real worker process)."""

from __future__ import annotations

import asyncio

import pytest

from services.api.model_registry import ModelRegistry
from services.api.routing.kv_listener import KvListener
from services.api.routing.prefix_index import PrefixIndex
from shared.kv_blocks import full_block_hashes
from tests.support.stack import BusClient, Stack

pytestmark = pytest.mark.integration

BLOCK = 16


def prompt(seed: int, n: int = 50) -> list[int]:
    return [1 + (seed * 7919 + i * 31) % 200 for i in range(n)]


async def until(predicate, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def run_job(bus: BusClient, tokens: list[int]) -> None:
    job = bus.make_job(tokens, max_tokens=4, temperature=0.0, ignore_eos=True)
    await bus.submit(job)
    deltas = await bus.collect(job.id)
    assert deltas[-1].finished and deltas[-1].error is None


async def listener_on(bus: BusClient) -> tuple[KvListener, ModelRegistry]:
    registry = ModelRegistry(bus.js, stale_after_s=10.0)
    await registry.start()
    listener = KvListener(bus.nc, PrefixIndex(), registry)
    await listener.start()
    return listener, registry


async def test_index_follows_events_and_a_late_index_recovers_from_a_snapshot(
    bus_stack: Stack, bus: BusClient
) -> None:
    bus_stack.start_worker("--block-size", str(BLOCK))
    (status,) = await bus.workers()
    worker = status.worker_id
    assert status.block_size == BLOCK and status.routed_subject

    early, early_registry = await listener_on(bus)
    try:
        first = prompt(1)
        await run_job(bus, first)
        want = set(full_block_hashes(first, BLOCK))  # its 3 full prompt blocks at least
        await until(lambda: want <= early.index.hashes_of(worker))
        # The index equals what the worker says it holds (its snapshot).
        truth = await early.fetch_snapshot(status.model, worker)
        await until(lambda: early.index.workers[worker].seq == truth.seq)
        assert early.index.hashes_of(worker) == set(truth.hashes)
        assert early.index.workers[worker].block_size == BLOCK

        # A replica that starts now missed every event so far: the worker's heartbeat
        # (kv_seq ahead of its empty view) makes it ask for a snapshot.
        late, late_registry = await listener_on(bus)
        try:
            await until(lambda: want <= late.index.hashes_of(worker), timeout_s=15)
            # More traffic: both views stay equal to the worker's own.
            second = prompt(2, 70)
            await run_job(bus, second)
            truth = await early.fetch_snapshot(status.model, worker)
            for view in (early, late):
                await until(lambda v=view: v.index.workers[worker].seq >= truth.seq)
                assert view.index.hashes_of(worker) == set(truth.hashes)
            assert set(full_block_hashes(second, BLOCK)) <= late.index.hashes_of(worker)
        finally:
            await late.stop()
            await late_registry.stop()

        # Events lost in transit (dropped here by hand: a seq gap) are repaired too.
        index = early.index
        index.workers[worker].seq -= 1  # the next event looks like a jump of two
        await run_job(bus, prompt(3, 40))
        truth = await early.fetch_snapshot(status.model, worker)
        await until(lambda: index.hashes_of(worker) == set(truth.hashes), timeout_s=15)
    finally:
        await early.stop()
        await early_registry.stop()
