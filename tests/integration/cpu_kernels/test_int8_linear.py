"""The CPU int8 Linear (the C++ kernel for up to 16 rows, 16-row passes of it up to 256, a
dequantized matmul beyond) against the matmul with its dequantized weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.models.linear import Linear
from engine_worker.engine.models.quantization import (
    CPU_KERNEL_CHUNKED_MAX_ROWS,
    CPU_KERNEL_MAX_ROWS,
    Int8Linear,
)
from jetserve_kernels.cpu.build import cpu_ops


def _linear(cols: int, rows: int, bias: bool, seed: int) -> Linear:
    g = torch.Generator().manual_seed(seed)
    linear = Linear(cols, rows, bias=bias)
    linear.weight.data = torch.randn(rows, cols, generator=g) * 0.05
    if bias:
        linear.bias.data = torch.randn(rows, generator=g)
    return linear


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.one_of(
        st.integers(1, 2 * CPU_KERNEL_MAX_ROWS + 1),
        st.integers(CPU_KERNEL_CHUNKED_MAX_ROWS - 2, CPU_KERNEL_CHUNKED_MAX_ROWS + 2),
    ),
    cols=st.sampled_from([1, 7, 64, 512]),
    rows=st.integers(1, 80),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_dequantized_matmul(
    tokens: int, cols: int, rows: int, bias: bool, seed: int
) -> None:
    linear = _linear(cols, rows, bias, seed)
    q = Int8Linear(linear)
    assert q._cpu_kernel is not None
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1))
    expected = torch.nn.functional.linear(x, q.dequantized(torch.float32), linear.bias)
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations(dtype: torch.dtype) -> None:
    linear = _linear(96, 40, False, 0)
    x = torch.randn(3, 96).to(dtype)
    q = Int8Linear(linear)
    out = cpu_ops().int8_linear(x, q.qweight, q.scales)
    expected = x.float() @ q.dequantized(torch.float32).t()
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_strided_rows_and_3d_input() -> None:
    q = Int8Linear(_linear(32, 24, True, 5))
    wide = torch.randn(2, 4, 48)
    x = wide[..., :32]
    expected = torch.nn.functional.linear(x, q.dequantized(torch.float32), q.bias)
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=1e-5)


def test_a_rows_result_does_not_depend_on_its_batch() -> None:
    """Batch invariance through the 16-row passes: a sequence decodes the same tokens
    whoever shares its step (speculation and takeover compare such outputs exactly)."""
    q = Int8Linear(_linear(64, 96, True, 3))
    x = torch.randn(CPU_KERNEL_CHUNKED_MAX_ROWS, 64, generator=torch.Generator().manual_seed(4))
    together = q(x)
    for n in (1, 5, CPU_KERNEL_MAX_ROWS + 3, 100):
        assert torch.equal(q(x[:n]), together[:n])
    assert torch.equal(q(x[-7:]), together[-7:])
