"""Triton KV-cache write against the torch reference: exact copies into the given slots."""

from __future__ import annotations

import pytest
import torch

from jetserve_kernels.kv_cache_write import write_kv_cache_ref, write_kv_cache_triton


def caches(num_blocks: int, block_size: int, heads: int, dim: int, dtype: torch.dtype):
    # NaN-filled so a slot written by one side and not the other cannot compare equal
    k = torch.full((num_blocks, block_size, heads, dim), float("nan"), dtype=dtype)
    return k, k.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,dim", [(1, 64), (2, 128), (3, 80)])
def test_matches_reference(dtype: torch.dtype, heads: int, dim: int, device) -> None:
    g = torch.Generator().manual_seed(heads * dim)
    block_size, num_blocks = 4, 6
    # block edges (3, 4, 7, 8), the very first and last slot, and two padding entries
    slots = torch.tensor([0, 3, 4, -1, 7, 8, 23, 13, -1, 22])
    key = torch.randn(len(slots), heads, dim, generator=g).to(dtype)
    value = torch.randn(len(slots), heads, dim, generator=g).to(dtype)
    k_ref, v_ref = caches(num_blocks, block_size, heads, dim, dtype)
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    k_out, v_out = (c.to(device) for c in caches(num_blocks, block_size, heads, dim, dtype))
    write_kv_cache_triton(key.to(device), value.to(device), k_out, v_out, slots.to(device))
    torch.testing.assert_close(k_out.cpu(), k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_out.cpu(), v_ref, atol=0, rtol=0, equal_nan=True)
    written = k_ref.flatten(0, 1)[slots[slots >= 0]]
    assert not written.isnan().any()


def test_strided_views_of_a_fused_qkv(device) -> None:
    """Keys and values sliced out of one qkv projection are written without copies."""
    tokens, heads, dim = 5, 2, 64
    qkv = torch.randn(tokens, (4 + 2 * heads) * dim).to(device)
    key = qkv[:, 4 * dim : (4 + heads) * dim].view(tokens, heads, dim)
    value = qkv[:, (4 + heads) * dim :].view(tokens, heads, dim)
    assert not key.is_contiguous()
    slots = torch.tensor([9, 2, 5, 14, 0], device=device)
    k_ref, v_ref = caches(4, 4, heads, dim, torch.float32)
    write_kv_cache_ref(key.cpu(), value.cpu(), k_ref, v_ref, slots.cpu())
    k_out, v_out = (c.to(device) for c in caches(4, 4, heads, dim, torch.float32))
    write_kv_cache_triton(key, value, k_out, v_out, slots)
    torch.testing.assert_close(k_out.cpu(), k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_out.cpu(), v_ref, atol=0, rtol=0, equal_nan=True)


def test_casts_to_cache_dtype_and_empty_step(device) -> None:
    key = torch.randn(3, 2, 64)
    value = torch.randn(3, 2, 64)
    slots = torch.tensor([1, 6, 3])
    k_ref, v_ref = caches(2, 4, 2, 64, torch.float16)
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    k_out, v_out = (c.to(device) for c in caches(2, 4, 2, 64, torch.float16))
    write_kv_cache_triton(key.to(device), value.to(device), k_out, v_out, slots.to(device))
    torch.testing.assert_close(k_out.cpu(), k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_out.cpu(), v_ref, atol=0, rtol=0, equal_nan=True)
    before = k_out.clone()
    empty = torch.empty(0, 2, 64, device=device)
    write_kv_cache_triton(empty, empty, k_out, v_out, torch.empty(0, dtype=torch.int64))
    torch.testing.assert_close(k_out, before, atol=0, rtol=0, equal_nan=True)
