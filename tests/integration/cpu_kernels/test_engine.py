"""The engine on the C++ CPU backend (what 'auto' picks on a CPU) gives the torch reference
backend's greedy tokens: chunked prefill, prefix-cache hits and decodes mixed in steps,
on Llama and on Qwen3 (per-head q/k norms through the fused RMSNorm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams


def generate(path: Path, backend: str, prompts: list[list[int]], **kw) -> list[list[int]]:
    llm = LLM(str(path), attention_backend=backend, **kw)
    assert llm.engine.runner.backend.name == backend
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen3"])
def test_greedy_tokens_equal_the_torch_backend(arch: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(arch)
    shared = [0, 5, 6, 7, 8, 9, 10, 11, 12]
    prompts = [[*shared, 13, 14, 15], [0, 20, 21], [*shared, 40, 41], list(range(3, 40))]
    kw = dict(block_size=4, num_kv_blocks=96, max_num_batched_tokens=7)
    expected = generate(path, "torch", prompts, **kw)
    assert all(len(tokens) == 10 for tokens in expected)
    assert generate(path, "cpu", prompts, **kw) == expected


def test_auto_picks_the_cpu_kernels(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), num_kv_blocks=16, block_size=4)
    assert llm.engine.runner.backend.name == "cpu"
