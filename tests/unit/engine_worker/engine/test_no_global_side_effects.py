"""Constructing and running an engine leaves process-wide state alone: torch's global RNG
and the interpreter's GIL switch interval. Its randomness comes from its own generator,
seeded from EngineConfig.seed, so two engines with one seed sample alike whatever else
in the process draws random numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams

PROMPT = [1, 20, 31, 42, 53]
SAMPLED = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)  # no per-request seed


def test_engine_leaves_the_global_rng_and_switch_interval_alone(tiny_llama: Path) -> None:
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    interval_before = sys.getswitchinterval()
    llm = LLM(str(tiny_llama), seed=7)
    llm.generate([PROMPT], SAMPLED)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert sys.getswitchinterval() == interval_before


def test_unseeded_sampling_follows_the_engine_seed_not_the_global_rng(tiny_llama: Path) -> None:
    def sample(engine_seed: int, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)
        llm = LLM(str(tiny_llama), seed=engine_seed)
        return llm.generate([PROMPT], SAMPLED)[0].outputs[0].token_ids

    first = sample(engine_seed=7, global_seed=0)
    assert sample(engine_seed=7, global_seed=99) == first
    assert sample(engine_seed=8, global_seed=0) != first
