"""The C++ RMSNorm (with the fused residual add) and rotary against the torch references
the model otherwise calls, on the layouts the model hands them (strided q/k views)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jetserve_kernels.cpu.ops import rms_norm_cpu, rotary_cpu
from jetserve_kernels.rms_norm import rms_norm_ref
from jetserve_kernels.rotary import build_cos_sin_cache, rotary_ref

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    hidden=st.sampled_from([8, 64, 100, 512]),
    with_residual=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_matches_reference(
    rows: int, hidden: int, with_residual: bool, dtype: torch.dtype, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    weight = torch.randn(hidden, generator=g).to(dtype)
    residual = torch.randn(rows, hidden, generator=g).to(dtype) if with_residual else None
    out, res = rms_norm_cpu(x, weight, 1e-6, residual)
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, ref_out, atol=ATOL[dtype], rtol=ATOL[dtype])
    if with_residual:
        torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    else:
        assert res is None


def test_rms_norm_of_per_head_views() -> None:
    """Qwen3's q/k norms see [T, heads, head_dim] views of the fused qkv output."""
    qkv = torch.randn(5, 3 * 4 * 16)
    q = qkv[:, : 4 * 16].reshape(5, 4, 16)
    weight = torch.randn(16)
    out, _ = rms_norm_cpu(q, weight, 1e-6)
    torch.testing.assert_close(out, rms_norm_ref(q, weight, 1e-6)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rotary_matches_reference(dtype: torch.dtype, head_dim: int) -> None:
    g = torch.Generator().manual_seed(head_dim)
    cos_sin = build_cos_sin_cache(head_dim, 300, 10000.0)
    positions = torch.randint(0, 300, (13,), generator=g)
    qkv = torch.randn(13, (8 + 2 + 2) * head_dim, generator=g).to(dtype)
    q = qkv[:, : 8 * head_dim].view(13, 8, head_dim)  # strided, as the model passes them
    k = qkv[:, 8 * head_dim : 10 * head_dim].view(13, 2, head_dim)
    before = qkv.clone()
    got_q, got_k = rotary_cpu(positions, q, k, cos_sin)
    ref_q, ref_k = rotary_ref(positions, q, k, cos_sin)
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_q, ref_q, atol=atol, rtol=0)
    torch.testing.assert_close(got_k, ref_k, atol=atol, rtol=0)
    assert torch.equal(qkv, before)


def test_rotary_refuses_positions_beyond_the_table() -> None:
    cos_sin = build_cos_sin_cache(16, 8, 10000.0)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 16)
    with pytest.raises(RuntimeError, match="beyond the rotary table"):
        rotary_cpu(torch.tensor([8]), q, k, cos_sin)
