"""Async scheduling (a step scheduled and launched before the previous one's tokens are
read) gives what synchronous stepping gives: the same tokens, finish reasons and
logprobs, through preemption, chunked prefill, length limits, stop tokens, n > 1 and
aborts, with every KV block back at the end.

On the CPU `--async-scheduling auto` is off (the forward is the host's own work); the
tests force it on to run the same bookkeeping a CUDA worker runs, tokens of a launched
step feeding the next step's inputs on the device included.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_worker.engine.llm import LLM
from engine_worker.engine.llm_engine import LLMEngine
from shared.sampling_params import SamplingParams

CASES = {
    "plenty": {},
    "preempting": {"num_kv_blocks": 24},
    "chunked": {"max_num_batched_tokens": 8},
    "short_context": {"max_model_len": 20, "num_kv_blocks": 64},
}


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [[3 + i, 4, 5, 6, 7, 8, 9][: 3 + i % 5] * (1 + i % 3) for i in range(12)]
    params = [
        SamplingParams(
            max_tokens=5 + 3 * i,
            temperature=0.0 if i % 3 == 0 else 0.8,
            seed=None if i % 3 == 0 else i,  # sampled rows draw from their own generators
            n=2 if i % 4 == 1 else 1,
            logprobs=2 if i % 2 else None,
            stop_token_ids=[17] if i % 5 == 0 else [],
        )
        for i in range(12)
    ]
    return prompts, params


def outputs(model: Path, mode: str, **engine: int) -> tuple[list, LLMEngine]:
    llm = LLM(str(model), async_scheduling=mode, block_size=4, **engine)
    prompts, params = workload()
    results = llm.generate(prompts, params)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])
    got = [
        [(c.token_ids, c.finish_reason, [lp.logprob for lp in c.logprobs or []]) for c in r.outputs]
        for r in results
    ]
    return got, llm.engine


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_outputs_as_synchronous_steps(tiny_llama: Path, case: str) -> None:
    sync, sync_engine = outputs(tiny_llama, "off", **CASES[case])
    overlapped, engine = outputs(tiny_llama, "on", **CASES[case])
    assert not sync_engine.async_scheduling and engine.async_scheduling
    for a, b in zip(sync, overlapped, strict=True):
        for (tokens_a, reason_a, lps_a), (tokens_b, reason_b, lps_b) in zip(a, b, strict=True):
            assert tokens_a == tokens_b
            assert reason_a == reason_b
            # A preempting run batches rows differently in the two modes: the same
            # logprobs up to the matmul's rounding.
            assert lps_b == pytest.approx(lps_a, abs=1e-3)
    if case == "preempting":
        assert sync_engine.scheduler.num_preemptions and engine.scheduler.num_preemptions
    if case == "short_context":
        assert any(r == "length" and len(t) < 20 for out in overlapped for t, r, _ in out)


def drive(engine: LLMEngine, steps_before_abort: int) -> dict[str, list]:
    """Three requests; the second is aborted once `steps_before_abort` steps ran."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", [5 + i, 6, 7, 8, 9], params)
    got: dict[str, list] = {f"r{i}": [] for i in range(3)}
    steps = 0
    while engine.has_unfinished_requests():
        if steps == steps_before_abort:
            engine.abort_request("r1")
        for out in engine.step():
            for d in out.deltas:
                got[out.request_id].append((d.token_ids, d.finish_reason))
        steps += 1
    return got


@pytest.mark.parametrize("steps_before_abort", [1, 2, 5])
def test_an_abort_while_a_step_is_in_flight(tiny_llama: Path, steps_before_abort: int) -> None:
    engine = LLM(str(tiny_llama), async_scheduling="on", block_size=4).engine
    reference = LLM(str(tiny_llama), async_scheduling="off", block_size=4).engine
    got, want = drive(engine, steps_before_abort), drive(reference, steps_before_abort)
    assert got["r0"] == want["r0"] and got["r2"] == want["r2"]
    assert got["r1"][-1][1] == "abort"
    emitted = [t for tokens, _ in got["r1"] for t in tokens]
    # What it emitted before the abort is the start of what the request would have made.
    alone = [t for tokens, _ in drive(reference, steps_before_abort=-1)["r1"] for t in tokens]
    assert len(emitted) < 12 and emitted == alone[: len(emitted)]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_that_needs_host_tokens_lands_the_launched_step_first(
    tiny_llama: Path,
) -> None:
    """Penalties read each sequence's tokens on the host: while such a request runs the
    engine steps synchronously, and overlaps again once it is done."""
    engine = LLM(str(tiny_llama), async_scheduling="on", block_size=4).engine
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request("plain", [5, 6, 7, 8], plain)
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None
    penalised = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, presence_penalty=1.5)
    engine.add_request("penalised", [9, 10, 11], penalised)
    engine.step()
    assert engine._inflight is None  # landed; the next steps are synchronous
    while "penalised" in engine.requests:
        engine.step()
        assert engine._inflight is None
    engine.step()
    assert engine._inflight is not None  # overlapping again
    while engine.has_unfinished_requests():
        engine.step()

    reference = LLM(str(tiny_llama), async_scheduling="off", block_size=4)
    want = reference.generate([[5, 6, 7, 8], [9, 10, 11]], [plain, penalised])
    again = LLM(str(tiny_llama), async_scheduling="on", block_size=4)
    got = again.generate([[5, 6, 7, 8], [9, 10, 11]], [plain, penalised])
    assert [r.outputs[0].token_ids for r in got] == [r.outputs[0].token_ids for r in want]


def test_auto_is_off_on_the_cpu_and_speculation_turns_it_off(tiny_llama: Path) -> None:
    assert not LLM(str(tiny_llama)).engine.async_scheduling
    spec = LLM(str(tiny_llama), async_scheduling="on", speculative_method="ngram")
    assert not spec.engine.async_scheduling
