"""Triton rotary embedding against the torch reference, incl. llama3 frequency scaling."""

from __future__ import annotations

import pytest
import torch

from jetserve_kernels.rotary import build_cos_sin_cache, rotary_ref, rotary_triton

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_matches_reference(dtype: torch.dtype, head_dim: int, scaling, device) -> None:
    g = torch.Generator().manual_seed(head_dim)
    cache = build_cos_sin_cache(head_dim, 2048, 500000.0, scaling)
    positions = torch.tensor([0, 1, 255, 256, 2047, 1000, 17])
    query = torch.randn(7, 8, head_dim, generator=g).to(dtype)
    key = torch.randn(7, 2, head_dim, generator=g).to(dtype)
    q_in, k_in = query.clone(), key.clone()
    q_ref, k_ref = rotary_ref(positions, query, key, cache)
    q_out, k_out = rotary_triton(
        positions.to(device), query.to(device), key.to(device), cache.to(device)
    )
    tol = TOLERANCE[dtype]
    assert q_out.dtype == dtype and k_out.dtype == dtype
    torch.testing.assert_close(q_out.cpu().float(), q_ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(k_out.cpu().float(), k_ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(query, q_in, atol=0, rtol=0)
    torch.testing.assert_close(key, k_in, atol=0, rtol=0)


def test_llama3_scaling_changes_low_frequencies() -> None:
    """Guards that the scaled cache under test really differs from the unscaled one."""
    plain = build_cos_sin_cache(128, 2048, 500000.0)
    scaled = build_cos_sin_cache(128, 2048, 500000.0, LLAMA3)
    assert not torch.allclose(plain, scaled)
    torch.testing.assert_close(plain[:, :8], scaled[:, :8])  # high frequencies are kept


def test_views_of_a_fused_qkv_and_odd_head_counts(device) -> None:
    tokens, q_heads, kv_heads, dim = 4, 7, 1, 64
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim).to(device)
    query = qkv[:, : q_heads * dim].view(tokens, q_heads, dim)
    key = qkv[:, q_heads * dim : (q_heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    cache = build_cos_sin_cache(dim, 64, 10000.0).to(device)
    positions = torch.tensor([5, 6, 7, 63], device=device)
    q_ref, k_ref = rotary_ref(positions.cpu(), query.cpu(), key.cpu(), cache.cpu())
    q_out, k_out = rotary_triton(positions, query, key, cache)
    torch.testing.assert_close(q_out.cpu(), q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_out.cpu(), k_ref, atol=1e-6, rtol=1e-6)
