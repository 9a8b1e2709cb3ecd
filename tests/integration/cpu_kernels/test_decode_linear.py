"""The decode-batch matmul (kernels/jetserve_kernels/cpu/decode_linear.cpp; fp32 and bf16 weights) against
F.linear, and the CPU backend's Linear choosing it only for a decode step's few rows."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.models.layers import layer_ops_for
from engine_worker.engine.models.linear import Linear
from jetserve_kernels.cpu.ops import (
    DECODE_LINEAR_MAX_ROWS,
    STREAMED_MAX_ROWS,
    decode_linear_cpu,
    linear_cpu,
)
from tests.support.linear_cases import random_linear


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 2 * DECODE_LINEAR_MAX_ROWS + 1),
    # K around the 16- and 32-float vector steps, N around the thread split
    cols=st.sampled_from([1, 15, 16, 17, 31, 32, 48, 64, 100, 512]),
    out=st.integers(1, 300),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_f_linear(rows: int, cols: int, out: int, bias: bool, seed: int) -> None:
    x, w, b = random_linear(rows, cols, out, bias, seed)
    torch.testing.assert_close(
        decode_linear_cpu(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5
    )


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, STREAMED_MAX_ROWS[torch.bfloat16] + 1),
    cols=st.sampled_from([1, 15, 16, 17, 31, 32, 48, 64, 100, 512]),
    out=st.integers(1, 300),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bf16_is_the_fp32_sum_rounded_once(
    rows: int, cols: int, out: int, bias: bool, seed: int
) -> None:
    """bf16 weights and rows: every product and sum in fp32, y rounded to bf16 at the end
    (so within one bf16 step of F.linear over the same values in fp32)."""
    x, w, b = (t.to(torch.bfloat16) if t is not None else None for t in random_linear(
        rows, cols, out, bias, seed))  # fmt: skip
    got = decode_linear_cpu(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
    exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(got.float(), exact.to(torch.bfloat16).float(), atol=1e-3, rtol=2**-7)


def test_bf16_takes_the_kernel_up_to_its_rows() -> None:
    w = torch.randn(40, 24).to(torch.bfloat16)
    for rows in (1, STREAMED_MAX_ROWS[torch.bfloat16], 2 * STREAMED_MAX_ROWS[torch.bfloat16]):
        x = torch.randn(rows, 24).to(torch.bfloat16)
        y = linear_cpu(x, w)
        assert y.dtype == torch.bfloat16
        exact = torch.nn.functional.linear(x.float(), w.float())
        torch.testing.assert_close(y.float(), exact, atol=2e-2, rtol=2**-7)


def test_strided_rows_and_threads() -> None:
    wide = torch.randn(5, 700)
    x = wide[:, :512]  # rows not contiguous with each other, columns contiguous
    w = torch.randn(3000, 512)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.testing.assert_close(decode_linear_cpu(x, w), x @ w.t(), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_linear_cpu_takes_the_kernel_for_decode_rows_only() -> None:
    w = torch.randn(40, 24)
    for shape in [
        (1, 24),
        (2, 3, 24),
        (DECODE_LINEAR_MAX_ROWS, 24),
        (3 * DECODE_LINEAR_MAX_ROWS, 24),
    ]:
        x = torch.randn(*shape)
        y = linear_cpu(x, w)
        assert y.shape == (*shape[:-1], 40)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)
    # what the kernel does not handle goes to F.linear unchanged
    half = torch.randn(2, 24).to(torch.bfloat16)
    assert linear_cpu(half, w.to(torch.bfloat16)).dtype == torch.bfloat16
    xg = torch.randn(1, 24, requires_grad=True)
    linear_cpu(xg, w).sum().backward()
    assert xg.grad is not None


def test_cpu_backend_linears_use_it() -> None:
    ops = layer_ops_for("cpu")
    assert ops.linear is linear_cpu
    linear = Linear(24, 40, matmul=ops.linear)
    linear.weight.data = torch.randn(40, 24)
    x = torch.randn(1, 24)
    torch.testing.assert_close(linear(x), x @ linear.weight.t(), atol=1e-5, rtol=1e-5)
    assert layer_ops_for("torch").linear is torch.nn.functional.linear
