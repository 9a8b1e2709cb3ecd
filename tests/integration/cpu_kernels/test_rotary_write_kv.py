"""The fused rotary-and-cache-write kernel (kernels/jetserve_kernels/cpu/qkv_cache.cpp) gives bit for bit
what the model computed before it: the rotary kernel on q and k views of the qkv rows,
then write_kv of k and v; the torch references agree within rounding. Padding slots are
skipped and nothing outside the step's slots is touched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jetserve_kernels.cpu.ops import rotary_cpu, rotary_write_kv_cpu, write_kv_cache_cpu
from jetserve_kernels.rotary import build_cos_sin_cache, rotary_ref


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(1, 70),
    heads=st.sampled_from([(8, 2), (4, 4), (2, 1)]),
    head_dim=st.sampled_from([16, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    padding=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_equals_rotary_then_write_kv(
    tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, padding: int, seed: int
) -> None:
    hq, hkv = heads
    g = torch.Generator().manual_seed(seed)
    block_size, blocks = 4, 40
    cos_sin = build_cos_sin_cache(head_dim, 400, 10000.0)
    positions = torch.randint(0, 400, (tokens,), generator=g)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=g).to(dtype)
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
    slots[:padding] = -1
    cache_shape = (blocks, block_size, hkv, head_dim)
    k_ref = torch.randn(cache_shape, generator=g).to(dtype)
    v_ref = torch.randn(cache_shape, generator=g).to(dtype)
    k_got, v_got = k_ref.clone(), v_ref.clone()

    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    v = qkv[:, (hq + hkv) * head_dim :].view(tokens, hkv, head_dim)
    ref_q, ref_k = rotary_cpu(positions, q, k, cos_sin)
    write_kv_cache_cpu(ref_k, v, k_ref, v_ref, slots)

    got_q = rotary_write_kv_cpu(qkv, positions, cos_sin, k_got, v_got, slots, hq, hkv)
    assert got_q.shape == (tokens, hq, head_dim)
    assert torch.equal(got_q, ref_q)
    assert torch.equal(k_got, k_ref)
    assert torch.equal(v_got, v_ref)
    # and the torch reference rotary, within rounding
    torch_q, _ = rotary_ref(positions, q, k, cos_sin)
    atol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_q, torch_q, atol=atol, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    tokens=st.integers(1, 40),
    cache_dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_fp32_rows_into_a_half_precision_cache(
    tokens: int, cache_dtype: torch.dtype, seed: int
) -> None:
    """--kv-cache-dtype under an fp32 model: q stays fp32 and exact; k is rotated in fp32
    and rounded once into the cache, so the cache holds what the fp32 path computed,
    rounded (no double rounding)."""
    hq, hkv, head_dim = 4, 2, 64
    g = torch.Generator().manual_seed(seed)
    cos_sin = build_cos_sin_cache(head_dim, 400, 10000.0)
    positions = torch.randint(0, 400, (tokens,), generator=g)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=g)
    slots = torch.randperm(40 * 4, generator=g)[:tokens]
    shape = (40, 4, hkv, head_dim)
    k32, v32 = torch.zeros(shape), torch.zeros(shape)
    want_q = rotary_write_kv_cpu(qkv, positions, cos_sin, k32, v32, slots, hq, hkv)
    k_half, v_half = torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype)
    got_q = rotary_write_kv_cpu(qkv, positions, cos_sin, k_half, v_half, slots, hq, hkv)
    assert got_q.dtype == torch.float32 and torch.equal(got_q, want_q)
    assert torch.equal(k_half, k32.to(cache_dtype))
    assert torch.equal(v_half, v32.to(cache_dtype))


def test_refuses_bad_positions_slots_and_shapes() -> None:
    cos_sin = build_cos_sin_cache(16, 8, 10000.0)
    cache = torch.zeros(2, 4, 1, 16)
    qkv = torch.randn(1, (2 + 2) * 16)
    pos, slot = torch.tensor([3]), torch.tensor([5])
    with pytest.raises(RuntimeError, match="beyond the rotary table"):
        rotary_write_kv_cpu(qkv, torch.tensor([8]), cos_sin, cache, cache.clone(), slot, 2, 1)
    with pytest.raises(RuntimeError, match="outside the cache"):
        rotary_write_kv_cpu(qkv, pos, cos_sin, cache, cache.clone(), torch.tensor([8]), 2, 1)
    with pytest.raises(RuntimeError, match="qkv is"):
        rotary_write_kv_cpu(qkv, pos, cos_sin, cache, cache.clone(), slot, 3, 1)
