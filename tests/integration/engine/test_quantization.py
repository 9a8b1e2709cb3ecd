"""--quantization int8|fp8 end to end through the engine: the quantized engine decodes
exactly what the unquantized engine decodes on the dequantized weights (the weights the
quantized model stands for), on Llama and Qwen2 (biases, tied embeddings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_worker.engine.llm import LLM
from engine_worker.engine.models.layers import layer_ops_for
from engine_worker.engine.models.linear import Linear, bind_weight_matmuls
from engine_worker.engine.models.quantization import QuantizedLinear
from shared.sampling_params import SamplingParams

PROMPTS = [[0, 5, 6, 7, 8, 9, 10, 11], [0, 20, 21], list(range(3, 30))]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
KW = dict(block_size=4, num_kv_blocks=64, max_num_batched_tokens=9)


def _tokens(llm: LLM) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY)]


def _dequantized_reference(path: Path, quantized: LLM) -> LLM:
    """The unquantized engine with every Linear's weight replaced by the quantized one's
    dequantized weight (and bound again: the CPU backend packs weights as they are when
    the engine loads them)."""
    ref = LLM(str(path), **KW)
    quantized_modules = dict(quantized.engine.runner.model.named_modules())
    swapped = 0
    for name, module in ref.engine.runner.model.named_modules():
        if isinstance(module, Linear):
            q = quantized_modules[name]
            assert isinstance(q, QuantizedLinear)
            module.weight.data.copy_(q.dequantized(module.weight.dtype))
            swapped += 1
    assert swapped > 0
    matmul_for = layer_ops_for(ref.engine.runner.backend.name).matmul_for
    if matmul_for is not None:
        bind_weight_matmuls(ref.engine.runner.model, matmul_for)
    return ref


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_quantized_engine_decodes_its_dequantized_weights(
    method: str, arch: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(arch)
    quantized = LLM(str(path), quantization=method, **KW)
    model = quantized.engine.runner.model
    assert model.layers[0].mlp.down.method == method
    assert model.layers[0].attn.qkv.qweight.dtype == (
        torch.int8 if method == "int8" else torch.float8_e4m3fn
    )
    got = _tokens(quantized)
    assert all(len(t) == 10 for t in got)
    assert got == _tokens(_dequantized_reference(path, quantized))
