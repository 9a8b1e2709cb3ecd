"""The engine on the Triton attention backend gives the torch backend's greedy tokens:
whole generations on tiny checkpoints (in Triton's interpreter on a CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams


def generate(path: Path, backend: str, prompts: list[list[int]], **kw) -> list[list[int]]:
    llm = LLM(str(path), attention_backend=backend, dtype="float32", **kw)
    assert llm.engine.runner.backend.name == backend
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen3"])
def test_engine_greedy_tokens_equal(
    arch: str, request: pytest.FixtureRequest, device: torch.device
) -> None:
    """Chunked prefill (5-token budget), prefix-cache hits and decodes mixed in steps."""
    path = request.getfixturevalue(arch)
    shared = [0, 5, 6, 7, 8, 9, 10, 11, 12]
    prompts = [[*shared, 13, 14, 15], [0, 20, 21], [*shared, 40, 41]]
    kw = dict(block_size=4, num_kv_blocks=64, max_num_batched_tokens=5, device=device.type)
    expected = generate(path, "torch", prompts, **kw)
    assert all(len(tokens) == 6 for tokens in expected)
    assert generate(path, "triton", prompts, **kw) == expected
