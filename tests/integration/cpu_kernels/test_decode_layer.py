"""The one-call CPU decoder layer (kernels/jetserve_kernels/cpu/decode_layer.cpp): a step's rows through it
(decodes, prefills, past the streamed rows through the prepacked weights) give the same
bits as the layer's modules calling the same kernels one by one, and the model takes it
only where the layer is exactly that chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import jetserve_kernels.cpu.ops as cpu_ops
from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.engine.models.llama import fused_decode_weights
from jetserve_kernels.cpu.ops import STREAMED_MAX_ROWS
from jetserve_kernels.cpu.packed_matmul import packing_available
from shared.sampling_params import SamplingParams

PROMPTS = [[1, 5, 9, 13, 2, 7], [1, 4, 4, 8], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]


def run(engine: LLMEngine, params: list[SamplingParams]) -> dict[str, tuple]:
    """Token ids and logprobs per request, the prompts decoding side by side."""
    for i, (prompt, p) in enumerate(zip(PROMPTS, params, strict=True)):
        engine.add_request(str(i), prompt, p)
    got: dict[str, tuple[list, list]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids, lps = got.setdefault(out.request_id, ([], []))
            for d in out.deltas:
                ids.extend(d.token_ids)
                lps.extend((lp.token_id, lp.logprob) for lp in d.logprobs or [])
    return got


def engines(model: Path, dtype: str) -> tuple[LLMEngine, LLMEngine]:
    def make() -> LLMEngine:
        config = EngineConfig(
            model=str(model), num_kv_blocks=64, attention_backend="cpu", dtype=dtype
        )
        return LLMEngine(config)

    fused, plain = make(), make()
    plain.runner.model._fused_decode = lambda backend, x: None  # the modules one by one
    return fused, plain


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_bits_as_the_layer_by_layer_path(tiny_llama: Path, dtype: str, monkeypatch) -> None:
    calls = []
    real = cpu_ops.decode_layer_cpu
    monkeypatch.setattr(cpu_ops, "decode_layer_cpu", lambda *a: calls.append(1) or real(*a))
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=9, temperature=0.8, seed=7, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True),
    ]
    fused, plain = engines(tiny_llama, dtype)
    want = run(plain, params)
    assert not calls
    got = run(fused, params)
    assert calls, "the decode steps went through the one-call layer"
    assert got == want


def test_taken_only_for_the_exact_chain(
    tiny_llama: Path, tiny_qwen2: Path, tiny_qwen3: Path
) -> None:
    def model_of(path: Path, **kw):
        return LLMEngine(EngineConfig(model=str(path), num_kv_blocks=16, **kw)).runner.model

    cpu = model_of(tiny_llama, attention_backend="cpu")
    assert all(fused_decode_weights(layer) is not None for layer in cpu.layers)
    _, packed = fused_decode_weights(cpu.layers[0])
    # Past the streamed rows each matmul takes its Linear's prepacked weight, where it has one.
    assert len(packed) == 4 and all((p.numel() > 0) == packing_available() for p in packed)
    rows = STREAMED_MAX_ROWS[torch.float32]
    backend = type("B", (), {"name": "cpu"})()
    for n in (1, rows, rows + 1, 300):  # a decode step, a verification step, a prefill
        assert cpu._fused_decode(backend, torch.zeros(n, 8)) is not None
    assert cpu._fused_decode(backend, torch.zeros(4, 8, dtype=torch.float16)) is None
    int8 = model_of(tiny_llama, attention_backend="cpu", quantization="int8")
    qwen2 = model_of(tiny_qwen2, attention_backend="cpu")  # qkv biases
    qwen3 = model_of(tiny_qwen3, attention_backend="cpu")  # q/k norms
    torch_ops = model_of(tiny_llama, attention_backend="torch")
    for model in (int8, qwen2, qwen3, torch_ops):
        assert all(fused_decode_weights(layer) is None for layer in model.layers)
