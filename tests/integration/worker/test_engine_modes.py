"""A worker serves the same way with its engine in a child process (--engine-process)
or in a thread (the default): tokens and logprobs equal the in-process engine, a
cancel stops a running job, and SIGTERM stops the engine with the worker (exit 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams
from tests.support.engine_process import engine_pid, wait_gone
from tests.support.stack import BusClient, Stack, finish_reasons, tokens_by_index

PROMPT = [1, 5, 6, 7, 8]


@pytest.mark.parametrize("mode", ["--engine-process", "--no-engine-process"])
async def test_worker_serves_and_cancels_in_either_mode(
    bus_stack: Stack, bus: BusClient, tiny_llama_long: Path, mode: str
) -> None:
    worker = bus_stack.start_worker(mode, model_dir=tiny_llama_long)  # room for a long job
    bus.model = tiny_llama_long.name
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)
    job = bus.make_job(PROMPT, max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)
    endless = bus.make_job(PROMPT, max_tokens=4000, ignore_eos=True)
    await bus.submit(job)
    await bus.submit(endless)
    deltas = await bus.collect(job.id)
    want = LLM(str(tiny_llama_long)).generate([PROMPT], [params])[0].outputs[0]
    assert tokens_by_index(deltas) == {0: want.token_ids}
    got_logprobs = [lp for d in deltas for c in d.chunks for lp in (c.logprobs or [])]
    assert [lp[0] for lp in got_logprobs] == want.token_ids
    assert [len(lp[2]) for lp in got_logprobs] == [2] * 12

    stream = bus.deltas(endless.id)
    await anext(stream)
    await bus.cancel(endless.id)
    rest = [d async for d in stream]
    assert finish_reasons(rest) == {0: "abort"}

    started = [e for e in worker.log_events() if e.get("event") == "engine_process_started"]
    child = engine_pid(worker) if mode == "--engine-process" else None
    assert len(started) == (1 if child else 0)
    assert worker.stop() == 0
    if child is not None:
        assert wait_gone(child, 10)
