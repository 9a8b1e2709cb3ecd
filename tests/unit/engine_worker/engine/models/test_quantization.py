"""Per-channel weight quantization: the stored weights reconstruct W within half a step
of each row's grid, fp8 Linear equals the matmul with its dequantized weight, and
quantize_model swaps every projection of a model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.config import ModelConfig
from engine_worker.engine.models.linear import Linear
from engine_worker.engine.models.llama import LlamaForCausalLM
from engine_worker.engine.models.quantization import (
    Fp8Linear,
    quantize_fp8,
    quantize_int8,
    quantize_model,
)


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[0] = 0.0  # an all-zero channel must not divide by zero
    return w


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_int8_round_trip_within_half_a_step(rows: int, cols: int, seed: int) -> None:
    w = _weight(rows, cols, seed)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (rows,)
    assert int(q.abs().max()) <= 127
    err = (q.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())


def test_fp8_round_trip_relative_error() -> None:
    w = _weight(64, 96, 3)
    q, scales = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn
    back = q.float() * scales[:, None]
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 for normal values
    big = w.abs() > scales[:, None] * 2**-6
    assert bool(((back - w).abs() <= w.abs() * 2**-4 + 1e-9)[big].all())
    assert torch.equal(back[0], w[0])


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_equals_its_dequantized_matmul(bias: bool) -> None:
    torch.manual_seed(0)
    linear = Linear(48, 20, bias=bias)
    linear.weight.data.normal_()
    if bias:
        linear.bias.data.normal_()
    fp8 = Fp8Linear(linear)
    x = torch.randn(3, 5, 48)
    expected = torch.nn.functional.linear(x, fp8.dequantized(torch.float32), linear.bias)
    torch.testing.assert_close(fp8(x), expected, atol=1e-5, rtol=1e-5)
    # 3 mantissa bits: each weight within 1/16 relative, so the output within a few percent
    exact = linear(x)
    assert float((fp8(x) - exact).norm() / exact.norm()) < 0.05


def test_quantize_model_swaps_every_projection(caplog: pytest.LogCaptureFixture) -> None:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", family="llama", vocab_size=50, hidden_size=16,
        intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=32,
        tie_word_embeddings=False, qkv_bias=True, qk_norm=False, torch_dtype="float32",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg, 32)
    for p in model.parameters():
        p.data.normal_()
    assert quantize_model(model, "fp8") == 2 * 4 + 1  # qkv, o, gate_up, down per layer; lm_head
    # No fp8 matmul on the CPU: the operator is told, once, that this is slow here.
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "no fp8 matmul" in warning.getMessage() and "int8" in warning.getMessage()
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert model.layers[0].attn.qkv.bias is not None
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(model, "int4")
