"""Background tasks an object owns: they outlive the request that spawned them, a failure
is logged once on the owner's logger, and `wait` returns when all of them are done."""

from __future__ import annotations

import asyncio

import pytest

from shared.background_tasks import BackgroundTasks


class RecordingLog:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict]] = []

    def warning(self, event: str, **fields) -> None:
        self.warnings.append((event, fields))


@pytest.mark.unit
async def test_tasks_outlive_a_cancelled_request_and_failures_are_logged() -> None:
    log = RecordingLog()
    tasks = BackgroundTasks(log, "cleanup_failed")
    done: list[str] = []
    release = asyncio.Event()

    async def cleanup(name: str) -> None:
        await release.wait()
        done.append(name)

    async def broken() -> None:
        await release.wait()
        raise RuntimeError("nats gone")

    async def request() -> None:
        tasks.spawn(cleanup("refund"))
        tasks.spawn(broken())
        await asyncio.sleep(3600)

    handler = asyncio.create_task(request())
    await asyncio.sleep(0)
    handler.cancel()  # the client went away: its cleanup must still run
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert len(tasks) == 2
    release.set()
    await tasks.wait()
    assert done == ["refund"]
    assert log.warnings == [("cleanup_failed", {"error": "nats gone"})]
    assert len(tasks) == 0  # finished tasks are not kept


@pytest.mark.unit
async def test_wait_with_nothing_spawned_returns_at_once() -> None:
    tasks = BackgroundTasks(RecordingLog(), "x")
    await asyncio.wait_for(tasks.wait(), 1)
