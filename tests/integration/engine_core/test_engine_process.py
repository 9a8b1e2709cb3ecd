"""The engine in a real child process, driven from an event loop as the worker drives it:
tokens equal to the in-process engine, rejects and aborts, a clean stop, a loud death,
a failed build, and no child left behind when its parent is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine_worker.engine.llm import LLM
from engine_worker.engine_core.client import EngineFailed, EngineProcess
from engine_worker.engine_core.messages import AddRequest, StepResult
from shared.sampling_params import SamplingParams
from tests.support.engine_process import process_gone, wait_gone
from tests.support.paths import REPO_ROOT

PROMPT = [1, 5, 6, 7]


def settings_for(model: Path, **engine: object) -> dict:
    return {
        "engine": {"model": str(model), "num_kv_blocks": 64, **engine},
        "log_level": "warning",
        "idle_wait_s": 0.05,
    }


async def next_result(results: asyncio.Queue[StepResult]) -> StepResult:
    return await asyncio.wait_for(results.get(), 30)


async def test_serves_like_the_in_process_engine_and_frees_on_abort(tiny_llama: Path) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = LLM(str(tiny_llama)).generate([PROMPT], [params])[0].outputs[0].token_ids
    results: asyncio.Queue[StepResult] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    engine = EngineProcess(settings_for(tiny_llama, max_num_seqs=1), loop, results.put_nowait)
    info = await engine.launch(timeout_s=120)
    assert info.snapshot.admit_slots == 1 and info.snapshot.stats.num_total_blocks == 64
    assert info.facts.family == "llama" and info.max_model_len > len(PROMPT)
    engine.start()
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    engine.add(AddRequest("a", PROMPT, params))
    engine.add(AddRequest("b", PROMPT, long))
    engine.add(AddRequest("bad", [1, 10**7], params))
    tokens: dict[str, list[int]] = {}
    rejected: list[str] = []
    try:
        while len(tokens.get("b", [])) < 3:
            r = await next_result(results)
            assert r.fatal is None and r.adds_applied == 3
            rejected += [rid for rid, _ in r.rejected]
            for out in r.outputs:
                tokens.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
        assert rejected == ["bad"]
        assert tokens["a"] == expected  # max_num_seqs=1: "a" ran first, alone
        engine.abort("b")
        final = None
        while final is None or final.stats.num_running or final.stats.num_waiting:
            final = await next_result(results)
        assert final.stats.num_free_blocks == 64 and final.admit_slots == 1
        assert engine.alive
    finally:
        engine.stop()
        assert await asyncio.to_thread(engine.join, 30)
    assert not engine.alive and engine._proc is not None and engine._proc.returncode == 0


async def test_a_killed_engine_process_is_one_fatal_result(tiny_llama: Path) -> None:
    results: asyncio.Queue[StepResult] = asyncio.Queue()
    engine = EngineProcess(settings_for(tiny_llama), asyncio.get_running_loop(), results.put_nowait)
    await engine.launch(timeout_s=120)
    params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
    engine.add(AddRequest("a", PROMPT, params))
    assert (await next_result(results)).fatal is None
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    while (r := await next_result(results)).fatal is None:
        pass
    assert "exited unexpectedly: signal SIGKILL" in r.fatal
    assert not engine.alive
    engine.add(AddRequest("late", PROMPT, params))  # a dead link swallows commands
    engine.stop()
    assert await asyncio.to_thread(engine.join, 5)
    await asyncio.sleep(0.2)
    assert results.empty()  # one report, nothing after it


async def test_a_model_that_does_not_load_fails_the_launch(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    engine = EngineProcess(settings_for(tmp_path / "missing"), loop, lambda r: None)
    with pytest.raises(EngineFailed, match=r"exit code 1.*does not exist"):
        await engine.launch(timeout_s=120)
    assert not engine.alive


CHILD_OF_A_DOOMED_PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from engine_worker.engine_core.client import EngineProcess

    async def main():
        settings = {"engine": {"model": sys.argv[1], "num_kv_blocks": 16},
                    "log_level": "warning"}
        engine = EngineProcess(settings, asyncio.get_running_loop(), lambda r: None)
        await engine.launch(timeout_s=120)
        print(engine.pid, flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_killing_the_parent_takes_the_engine_process_with_it(tiny_llama: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD_OF_A_DOOMED_PARENT, str(tiny_llama)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not process_gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_gone(child), f"engine process {child} outlived its parent"
    finally:
        parent.kill()
