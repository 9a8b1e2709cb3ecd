"""The CPU backend's load-time packed fp32 and bf16 matmul (kernels/jetserve_kernels/cpu/packed_matmul.py) against
F.linear, its refusal of a weight it did not pack, and the engine binding it to every
plain fp32 Linear (quantized ones keep their kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.llm import LLM
from engine_worker.engine.models.linear import Linear, bind_weight_matmuls
from engine_worker.engine.models.quantization import Int8Linear
from jetserve_kernels.cpu.ops import DECODE_LINEAR_MAX_ROWS, linear_cpu
from jetserve_kernels.cpu.packed_matmul import PackedMatmul, matmul_for, packing_available
from tests.support.linear_cases import random_linear

if not packing_available():
    pytest.skip("this torch has no oneDNN prepacked linear", allow_module_level=True)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.sampled_from([1, 7, 8, 9, 16, 33, 64, 65, 200]),
    cols=st.sampled_from([1, 15, 16, 17, 64, 100, 512]),
    out=st.integers(1, 300),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_f_linear(rows: int, cols: int, out: int, bias: bool, seed: int) -> None:
    x, w, b = random_linear(rows, cols, out, bias, seed)
    y = PackedMatmul(w)(x, w, b)
    assert y.shape == (rows, out)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.sampled_from([1, 4, 5, 16, 64, 65]),
    cols=st.sampled_from([1, 16, 17, 64, 512]),
    out=st.integers(1, 300),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bf16_matches_f_linear(rows: int, cols: int, out: int, bias: bool, seed: int) -> None:
    """A bf16 weight packs too; any row count gives F.linear's bf16 result (fp32 sums,
    rounded once, so within a bf16 step of it)."""
    x, w, b = (t.to(torch.bfloat16) if t is not None else None for t in random_linear(
        rows, cols, out, bias, seed))  # fmt: skip
    y = PackedMatmul(w)(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out)
    exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(y.float(), exact, atol=2e-2, rtol=2**-7)


def test_batched_shapes_strides_and_threads() -> None:
    w = torch.randn(700, 96)
    matmul = PackedMatmul(w)
    wide = torch.randn(3, 40, 130)
    x = wide[..., :96]  # [3, 40, 96], rows not contiguous with each other
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = matmul(x, w)
            assert y.shape == (3, 40, 700)
            torch.testing.assert_close(y, x @ w.t(), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_a_weight_it_did_not_pack_takes_the_plain_matmul() -> None:
    w = torch.randn(50, 32)
    matmul = PackedMatmul(w)
    x = torch.randn(4 * DECODE_LINEAR_MAX_ROWS, 32)
    other = torch.randn(50, 32)
    torch.testing.assert_close(matmul(x, other), x @ other.t(), atol=1e-4, rtol=1e-5)
    w.mul_(2)  # changed in place after packing: the pack is stale and must not be read
    assert not matmul.packs(w)
    torch.testing.assert_close(matmul(x, w), x @ w.t(), atol=1e-4, rtol=1e-5)
    xg = torch.randn(2 * DECODE_LINEAR_MAX_ROWS, 32, requires_grad=True)
    matmul(xg, other).sum().backward()
    assert xg.grad is not None


def test_bind_packs_plain_fp32_linears_only() -> None:
    model = torch.nn.ModuleList(
        [Linear(32, 48, matmul=linear_cpu), Linear(32, 48, bias=True, matmul=linear_cpu)]
    )
    for p in model.parameters():
        p.data.normal_()
    plain = Linear(32, 16, matmul=linear_cpu)
    plain.weight.data.normal_()
    model.append(Int8Linear(plain))
    x = torch.randn(40, 32)
    quantized_before = model[2](x)
    bind_weight_matmuls(model, matmul_for)
    assert isinstance(model[0].matmul, PackedMatmul)
    assert isinstance(model[1].matmul, PackedMatmul)
    assert not hasattr(model[2], "matmul")
    assert torch.equal(model[2](x), quantized_before)
    torch.testing.assert_close(model[1](x), x @ model[1].weight.t() + model[1].bias)
    assert isinstance(matmul_for(torch.randn(4, 4).to(torch.bfloat16)), PackedMatmul)
    assert matmul_for(torch.randn(4, 4).to(torch.float16)) is linear_cpu


def test_engine_packs_on_the_cpu_backend_only(tiny_llama: Path) -> None:
    cpu = LLM(str(tiny_llama), attention_backend="cpu", num_kv_blocks=16, block_size=4)
    linears = [m for m in cpu.engine.runner.model.modules() if type(m) is Linear]
    assert linears and all(isinstance(m.matmul, PackedMatmul) for m in linears)
    ref = LLM(str(tiny_llama), attention_backend="torch", num_kv_blocks=16, block_size=4)
    assert not any(
        isinstance(m.matmul, PackedMatmul)
        for m in ref.engine.runner.model.modules()
        if type(m) is Linear
    )
