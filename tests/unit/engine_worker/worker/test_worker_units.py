"""Worker building blocks in-process: engine thread, job state transforms, cancel memory,
status endpoint. The NATS side: tests/integration/worker/ (intake and outbox in-process)
and test_worker.py (the whole process)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.engine.outputs import CompletionDelta, RequestOutput, TokenLogprob
from engine_worker.worker.cancel_memory import CancelMemory
from engine_worker.worker.engine_thread import AddRequest, EngineThread, StepResult
from engine_worker.worker.job_state import (
    JobState,
    delta_from_output,
    final_delta,
    sampling_params,
    state_from_history,
)
from engine_worker.worker.status_server import StatusServer
from shared.bus.job_events import fold_all
from shared.messages import CompletionChunk, Delta, Job, SamplingParams
from shared.metrics import new_registry, worker_metrics


def _job(job_id: str = "j1", n: int = 1, created_at: float | None = None) -> Job:
    return Job(
        id=job_id,
        model="m",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4, n=n, seed=5),
        created_at=time.time() if created_at is None else created_at,
        reply_to=f"llm.events.{job_id}",
    )


def test_cancel_memory_expires_and_is_bounded() -> None:
    now = [100.0]
    mem = CancelMemory(ttl_s=10.0, max_entries=3, clock=lambda: now[0])
    mem.add("a")
    now[0] = 105.0
    mem.add("b")
    assert "a" in mem and "b" in mem and "c" not in mem
    now[0] = 111.0
    assert "a" not in mem and "b" in mem  # a expired after 10 s
    for key in ("c", "d", "e"):
        mem.add(key)
    assert len(mem) == 3 and "b" not in mem  # bounded: the oldest goes first
    mem.discard("c")
    assert "c" not in mem and len(mem) == 2


def test_delta_from_output_numbers_and_accounts() -> None:
    state = JobState(_job(n=2, created_at=1000.0), msg=None, added_at=1000.25)
    lp = TokenLogprob(7, -0.5, [(7, -0.5), (9, -1.5)])
    step1 = RequestOutput("j1", [CompletionDelta(0, [7], [lp])], False, 3, 0)
    step2 = RequestOutput(
        "j1",
        [CompletionDelta(0, [8, 9], None, "length"), CompletionDelta(1, [4], None, "stop", 4)],
        True,
        3,
        2,
    )
    state.gpu_time_s = 0.5
    d1 = delta_from_output(state, step1, "w")
    d2 = delta_from_output(state, step2, "w")
    assert (d1.seq, d1.finished, d1.usage, d1.worker_id) == (0, False, None, "w")
    assert d1.chunks[0].logprobs == [(7, -0.5, [(7, -0.5), (9, -1.5)])]
    assert (d2.seq, d2.finished) == (1, True)
    assert [c.finish_reason for c in d2.chunks] == ["length", "stop"]
    assert d2.usage.prompt_tokens == 3 and d2.usage.cached_tokens == 2
    assert d2.usage.completion_tokens == 4
    assert d2.usage.queue_time_s == pytest.approx(0.25)
    assert d2.usage.gpu_time_s == 0.5
    closing = final_delta(JobState(_job(n=3), msg=None), "abort", "w", error=None)
    assert closing.finished and [c.finish_reason for c in closing.chunks] == ["abort"] * 3
    assert sampling_params(_job()).seed == 5


@pytest.fixture(scope="module")
def small_engine(tiny_llama: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama), max_num_seqs=1, num_kv_blocks=64))


async def test_engine_thread_steps_off_the_loop_and_frees_on_abort(
    small_engine: LLMEngine,
) -> None:
    loop = asyncio.get_running_loop()
    results: asyncio.Queue[StepResult] = asyncio.Queue()
    thread = EngineThread(small_engine, loop, results.put_nowait, idle_wait_s=0.05)
    params = sampling_params(_job())
    params.max_tokens, params.ignore_eos = 200, True
    # Queued before the thread starts, so its first batch of commands holds all three.
    thread.add(AddRequest("a", [1, 5, 6, 7], params))
    thread.add(AddRequest("b", [1, 5, 6, 7], params))
    thread.add(AddRequest("bad", [1, 10**6], params))
    thread.start()
    try:
        tokens: dict[str, int] = {}
        rejected: list[str] = []
        ticks = 0
        while "a" not in tokens or tokens["a"] < 3:
            r = await asyncio.wait_for(results.get(), 10)
            ticks += 1
            rejected += [rid for rid, _ in r.rejected]
            for out in r.outputs:
                tokens[out.request_id] = tokens.get(out.request_id, 0) + sum(
                    len(d.token_ids) for d in out.deltas
                )
            # max_num_seqs=1: "b" waits inside, so nothing more may be pulled.
            assert r.admit_slots == 0
            assert r.adds_applied == 3
        assert rejected == ["bad"]
        assert "b" not in tokens
        thread.abort("a")
        thread.abort("b")
        final = None
        while final is None or final.stats.num_running or final.stats.num_waiting:
            final = await asyncio.wait_for(results.get(), 10)
        assert final.stats.num_free_blocks == final.stats.num_total_blocks == 64
        assert final.admit_slots == 1
    finally:
        thread.stop()
        assert await asyncio.to_thread(thread.join, 10)


async def test_status_server_routes() -> None:
    registry = new_registry()
    worker_metrics(registry).generation_tokens.labels(model_name="m").inc(3)
    healthy = [True]
    server = StatusServer(registry, lambda: (healthy[0], {"status": "x"}), "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert 'jetserve:generation_tokens_total{model_name="m"} 3.0' in metrics.text
            assert metrics.headers["content-type"].startswith("text/plain")
            assert (await client.get("/health")).json() == {"status": "x"}
            healthy[0] = False
            assert (await client.get("/health")).status_code == 503
            assert (await client.get("/other")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
    finally:
        await server.stop()


def test_state_from_history_continues_numbering_counts_and_fence() -> None:
    stored = [
        Delta("j1", 0, [CompletionChunk(0, [7, 8]), CompletionChunk(1, [9])], worker_id="w0"),
        Delta("j1", 1, [CompletionChunk(0, [10], finish_reason="length")], worker_id="w0"),
    ]
    history = fold_all("j1", stored)
    history.last_stream_seq = 42
    state = state_from_history(_job(n=2), None, history)
    assert state.next_seq == 2 and state.events.fence == 42
    assert state.resume_token_ids == [[7, 8, 10], [9]]
    assert state.produced == {0: 3, 1: 1} and state.completion_tokens == 4
    # Its next Delta continues the numbering and the usage counts every token produced.
    out = RequestOutput("j1@1", [CompletionDelta(1, [11], finish_reason="length")], True, 3, 0)
    delta = delta_from_output(state, out, "w1")
    assert delta.seq == 2 and delta.finished and delta.usage.completion_tokens == 5
    fresh = state_from_history(_job(), None, fold_all("j1", []))
    assert fresh.next_seq == 0 and fresh.resume_token_ids is None and fresh.events.fence == 0
