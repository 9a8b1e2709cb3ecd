"""The simulated engine: the real scheduler and bookkeeping, deterministic tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.factory import build_engine
from engine_worker.engine.llm import LLM
from engine_worker.engine.simulated.cost_model import shape_of, step_cost
from engine_worker.engine.simulated.engine import SimulatedEngine
from engine_worker.engine.simulated.profiles import PROFILES
from engine_worker.engine.simulated.tokens import allowed_token_ids, next_token
from shared.sampling_params import SamplingParams

SIM = dict(load_format="simulated", simulate_profile="h100-llama3-8b")


def expected_tokens(prompt: list[int], max_tokens: int, allowed: list[int]) -> list[int]:
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(next_token(context, allowed))
    return context[len(prompt) :]


def test_selected_explicitly_and_validated(tiny_llama: Path) -> None:
    assert not isinstance(build_engine(EngineConfig(model=str(tiny_llama))), SimulatedEngine)
    assert isinstance(build_engine(EngineConfig(model=str(tiny_llama), **SIM)), SimulatedEngine)
    with pytest.raises(ValueError, match="go together"):
        build_engine(EngineConfig(model=str(tiny_llama), load_format="simulated"))
    with pytest.raises(ValueError, match="unknown simulate profile"):
        build_engine(
            EngineConfig(model=str(tiny_llama), load_format="simulated", simulate_profile="x")
        )


def test_tokens_are_a_function_of_the_context_and_never_eos(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), **SIM)
    prompts = [[3, 4, 5, 6], [7, 8], [3, 4, 5, 6]]
    params = [
        SamplingParams(max_tokens=40, temperature=t, seed=s)
        for t, s in ((0, None), (1.0, 7), (0.7, 1))
    ]
    results = llm.generate(prompts, params)
    allowed = allowed_token_ids(llm.engine.model_config.vocab_size, llm.engine.eos_token_ids)
    assert llm.engine.eos_token_ids and not set(allowed) & llm.engine.eos_token_ids
    for prompt, res in zip(prompts, results, strict=True):
        out = res.outputs[0]
        assert out.token_ids == expected_tokens(prompt, 40, allowed)
        assert out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)
    assert results[0].outputs[0].token_ids == results[2].outputs[0].token_ids


def test_a_resumed_request_continues_as_if_never_interrupted(tiny_llama: Path) -> None:
    """What a worker taking a job over does: re-prefill prompt + produced tokens."""
    prompt = [9, 10, 11, 12, 13]
    full = LLM(str(tiny_llama), **SIM).generate([prompt], SamplingParams(max_tokens=30))[0]
    engine = build_engine(EngineConfig(model=str(tiny_llama), **SIM))
    done = full.outputs[0].token_ids[:12]
    engine.add_request("r", prompt, SamplingParams(max_tokens=30), resume_token_ids=[done])
    rest: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            rest.extend(t for d in out.deltas for t in d.token_ids)
    assert done + rest == full.outputs[0].token_ids


@pytest.mark.parametrize("mode", ["on", "off"])
def test_device_time_is_the_cost_model_of_each_scheduled_batch(tiny_llama: Path, mode: str) -> None:
    config = EngineConfig(
        model=str(tiny_llama), max_num_batched_tokens=8, async_scheduling=mode, **SIM
    )
    engine = build_engine(config)
    assert isinstance(engine, SimulatedEngine)
    assert engine.async_scheduling == (mode == "on")
    engine.add_request("a", list(range(3, 15)), SamplingParams(max_tokens=3))  # 12: 2 chunks
    expected = 0.0
    while engine.has_unfinished_requests():
        engine.step()
    profile = PROFILES["h100-llama3-8b"]
    # Chunks of 8 and 4 prompt tokens, then decodes at contexts 13 and 14.
    for n, ctx in ((8, 8), (4, 12), (1, 13), (1, 14)):
        expected += step_cost(profile, shape_of([(n, ctx)])).seconds
    stats = engine.device_stats
    assert stats.steps == 4
    assert stats.tokens == 14
    assert stats.device_s == pytest.approx(expected)
    assert stats.busy_device_s == pytest.approx(
        expected - step_cost(profile, shape_of([(1, 14)])).seconds
    )
    # The host never beats the device; launched ahead (async), the steps run back to back.
    assert stats.busy_period_s >= stats.busy_device_s * (1 - 1e-9)
    if mode == "on":
        assert stats.busy_period_s == pytest.approx(stats.busy_device_s)
