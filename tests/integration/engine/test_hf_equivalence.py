"""Greedy outputs and logits match Hugging Face transformers on the same weights (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm import LLM
from engine_worker.engine.llm_engine import LLMEngine
from shared.sampling_params import SamplingParams
from tests.support.hf_reference import hf_greedy, hf_model
from tests.support.model_factory import build_tiny_checkpoint

MAX_NEW = 12
PROMPTS = [
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
    [0, 20, 21],
    [0, 30, 31, 32, 33, 34, 35, 36],
    [0, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51],
]
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


def engine_greedy(path: Path, prompts: list[list[int]], **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), **kw)
    res = llm.generate(prompts, GREEDY)
    return [r.outputs[0].token_ids for r in res], llm


def expected(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(str(path), tuple(p), MAX_NEW) for p in prompts]


@pytest.fixture(params=["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def ckpt(request) -> Path:
    return request.getfixturevalue(request.param)


def test_batch_together(ckpt):
    got, _ = engine_greedy(ckpt, PROMPTS, block_size=4, num_kv_blocks=128)
    assert got == expected(ckpt, PROMPTS)


def test_chunked_prefill_forced(ckpt):
    got, _ = engine_greedy(ckpt, PROMPTS, block_size=4, num_kv_blocks=128, max_num_batched_tokens=5)
    assert got == expected(ckpt, PROMPTS)


def test_staggered_arrivals(ckpt):
    """Requests join a batch that is already decoding."""
    eng = LLMEngine(EngineConfig(model=str(ckpt), block_size=4, num_kv_blocks=128))
    outs: dict[str, list[int]] = {}
    pending = list(enumerate(PROMPTS))
    steps = 0
    while pending or eng.has_unfinished_requests():
        if pending and steps % 3 == 0:
            i, p = pending.pop(0)
            eng.add_request(f"r{i}", p, GREEDY)
        for out in eng.step():
            outs.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
        steps += 1
    assert [outs[f"r{i}"] for i in range(len(PROMPTS))] == expected(ckpt, PROMPTS)


def test_prefix_cache_hits(ckpt):
    shared = list(range(60, 80))
    prompts = [[0, *shared, 3], [0, *shared, 4, 5], [0, *shared]]
    llm = LLM(str(ckpt), block_size=4, num_kv_blocks=128)
    first = llm.generate(prompts[:1], GREEDY)
    second = llm.generate(prompts[1:], GREEDY)
    assert all(r.num_cached_tokens >= 16 for r in second)
    assert llm.engine.stats().prefix_cache_hit_rate > 0
    got = [r.outputs[0].token_ids for r in first + second]
    assert got == expected(ckpt, prompts)


def test_forced_preemption(ckpt):
    """A cache too small for all sequences at once: some are recomputed, none are dropped."""
    got, llm = engine_greedy(ckpt, PROMPTS, block_size=4, num_kv_blocks=14)
    assert llm.engine.stats().num_preemptions > 0
    assert got == expected(ckpt, PROMPTS)
    assert llm.engine.block_manager.num_free_blocks == 14


def test_one_step_logits_match(ckpt):
    eng = LLMEngine(EngineConfig(model=str(ckpt), block_size=4, num_kv_blocks=64))
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(f"r{i}", p, GREEDY)
    batch = eng.scheduler.schedule()
    logits = eng.runner.execute(batch.items, [True] * len(batch.items))
    model = hf_model(str(ckpt))
    for row, (seq, _) in enumerate(batch.items):
        with torch.no_grad():
            ref = model(torch.tensor([seq.token_ids])).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch,overrides",
    [
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                "rope_theta": 500000.0,
            },
        ),
        ("mistral", {}),
    ],
)
def test_other_family_members(tmp_path, arch, overrides):
    """Llama 3 rope scaling and Mistral, from a sharded checkpoint."""
    path = build_tiny_checkpoint(
        tmp_path / arch, arch=arch, seed=5, max_shard_size="40KB", **overrides
    )
    assert (path / "model.safetensors.index.json").exists()
    got, _ = engine_greedy(path, PROMPTS[:2], block_size=4, num_kv_blocks=64)
    assert got == expected(path, PROMPTS[:2])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_fp32(tiny_llama, dtype):
    ref = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32, dtype="float32"))
    half = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32, dtype=dtype))
    assert half.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    logits = []
    for eng in (ref, half):
        eng.add_request("r", PROMPTS[0], GREEDY)
        batch = eng.scheduler.schedule()
        logits.append(eng.runner.execute(batch.items, [True]))
    assert torch.allclose(logits[0], logits[1], atol=0.1, rtol=0.05)
