"""The engine on the C++ CPU backend (what 'auto' picks on a CPU) gives the torch reference
backend's greedy tokens: chunked prefill, prefix-cache hits and decodes mixed in steps,
on Llama and on Qwen3 (per-head q/k norms through the fused RMSNorm), with the KV cache
in the model's fp32 or in bf16 (--kv-cache-dtype)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams


def generate(path: Path, backend: str, prompts: list[list[int]], **kw) -> list[list[int]]:
    llm = LLM(str(path), attention_backend=backend, **kw)
    assert llm.engine.runner.backend.name == backend
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "bfloat16"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen3"])
def test_greedy_tokens_equal_the_torch_backend(
    arch: str, kv_cache_dtype: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(arch)
    shared = [0, 5, 6, 7, 8, 9, 10, 11, 12]
    prompts = [[*shared, 13, 14, 15], [0, 20, 21], [*shared, 40, 41], list(range(3, 40))]
    kw = dict(
        block_size=4, num_kv_blocks=96, max_num_batched_tokens=7, kv_cache_dtype=kv_cache_dtype
    )
    expected = generate(path, "torch", prompts, **kw)
    assert all(len(tokens) == 10 for tokens in expected)
    assert generate(path, "cpu", prompts, **kw) == expected


def test_auto_picks_the_cpu_kernels(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), num_kv_blocks=16, block_size=4)
    assert llm.engine.runner.backend.name == "cpu"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_bf16_kv_cache_under_fp32_weights(tiny_llama: Path, backend: str) -> None:
    """--kv-cache-dtype bfloat16: the same memory holds twice the blocks, and the outputs
    follow the fp32 cache's within bf16's rounding of K and V (the first token's logprobs;
    the backends read the rounded cache alike)."""
    prompts = [[0, 5, 6, 7, 8, 9, 10, 11, 12, 13], list(range(3, 40))]
    kw = dict(block_size=4, max_num_batched_tokens=7, kv_cache_memory=2**20)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, ignore_eos=True)

    def first_logprobs(**extra) -> tuple[LLM, list[dict[int, float]]]:
        llm = LLM(str(tiny_llama), attention_backend=backend, **kw, **extra)
        outs = llm.generate(prompts, params)
        return llm, [{t: lp for t, lp in o.outputs[0].logprobs[0].top} for o in outs]

    full, want = first_logprobs()
    half, got = first_logprobs(kv_cache_dtype="bfloat16")
    assert full.engine.kv_dtype == torch.float32 and half.engine.kv_dtype == torch.bfloat16
    assert half.engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    assert half.engine.block_manager.num_blocks == 2 * full.engine.block_manager.num_blocks
    for w, g in zip(want, got, strict=True):
        assert max(w, key=w.get) == max(g, key=g.get)
        common = w.keys() & g.keys()
        assert len(common) >= 4
        assert max(abs(w[t] - g[t]) for t in common) < 0.05


def test_a_cache_dtype_other_than_a_bf16_models_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="needs a float32 model"):
        LLM(str(tiny_llama), dtype="bfloat16", kv_cache_dtype="float16", num_kv_blocks=8)
