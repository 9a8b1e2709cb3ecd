"""Triton paged attention against the torch reference on mixed decode/prefill batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.paged_attention import (
    PagedAttentionTiling,
    paged_attention_ref,
    paged_attention_triton,
)
from tests.support.paged_batch import PagedBatch, build_paged_batch

# Small tiles so tiny shapes still cross tile, block and partition boundaries.
SMALL = PagedAttentionTiling(block_n=16, prefill_rows=16, decode_partition_size=32)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def run_both(
    batch: PagedBatch, device: torch.device, tiling: PagedAttentionTiling | None = SMALL
) -> tuple[torch.Tensor, torch.Tensor]:
    """(triton output, fp32 reference on the same rounded inputs)."""
    scale = batch.query.shape[-1] ** -0.5
    ref = paged_attention_ref(
        batch.query.float(),
        batch.k_cache.float(),
        batch.v_cache.float(),
        batch.query_start_loc,
        batch.seq_lens,
        batch.block_tables,
        scale,
        num_decodes=batch.num_decodes,
    )
    on = batch.to(device)
    out = paged_attention_triton(
        on.query,
        on.k_cache,
        on.v_cache,
        on.query_start_loc,
        on.seq_lens,
        on.block_tables,
        scale,
        num_decodes=on.num_decodes,
        query_lens_cpu=on.query_lens,
        seq_lens_cpu=on.seq_lens_list,
        tiling=tiling,
    )
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    return out.float().cpu(), ref


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_mixed_batch_gqa(gqa: int, device: torch.device) -> None:
    # decodes: a context of exactly one block, one past a block edge, one spanning partitions;
    # prefills: empty prefix, a chunk after a cached prefix, a chunk ending on a block edge.
    batch = build_paged_batch(
        query_lens=[1, 1, 1, 7, 5, 8],
        seq_lens=[8, 9, 70, 7, 21, 24],
        num_q_heads=2 * gqa,
        num_kv_heads=2,
        head_dim=64,
        block_size=8,
        seed=gqa,
    )
    assert batch.num_decodes == 3
    assert_close(*run_both(batch, device), torch.float32)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_dims_and_dtypes(head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    batch = build_paged_batch(
        query_lens=[1, 1, 12, 3],
        seq_lens=[40, 16, 12, 35],
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=16,
        dtype=dtype,
    )
    assert_close(*run_both(batch, device), dtype)


def test_split_k_matches_single_partition(device: torch.device) -> None:
    """Long decode contexts split over partitions reduce to the unsplit result."""
    batch = build_paged_batch(
        query_lens=[1, 1, 1],
        seq_lens=[200, 33, 129],
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
    )
    split, ref = run_both(batch, device)  # 7 partitions of 32 for the longest context
    whole, _ = run_both(batch, device, PagedAttentionTiling(block_n=16, decode_partition_size=208))
    assert_close(split, ref, torch.float32)
    torch.testing.assert_close(split, whole, atol=2e-5, rtol=0)


def test_one_token_contexts_and_only_prefills(device: torch.device) -> None:
    decodes = build_paged_batch([1, 1], [1, 2], 4, 4, 64, block_size=4)
    assert_close(*run_both(decodes, device), torch.float32)
    prefills = build_paged_batch([1, 4, 16], [3, 4, 20], 4, 1, 64, block_size=4)
    # a one-token chunk after a prefix, scheduled as a prefill: it sits among the prefills
    prefills.num_decodes = 0
    assert_close(*run_both(prefills, device), torch.float32)


def test_odd_block_size_and_group(device: torch.device) -> None:
    """Block sizes that do not divide a tile and a group of 7 q heads (Qwen2-0.5B's 14/2)."""
    batch = build_paged_batch([1, 1, 6, 11], [23, 5, 6, 30], 14, 2, 64, block_size=5)
    assert_close(*run_both(batch, device), torch.float32)


def test_default_gpu_tiling(device: torch.device) -> None:
    """The tiles and automatic split-K a GPU launch uses, at a size the interpreter affords."""
    batch = build_paged_batch([1, 1, 1, 70], [600, 17, 300, 90], 8, 2, 128, block_size=16)
    assert_close(*run_both(batch, device, tiling=None), torch.float32)


def test_decode_grid_bound_for_graph_capture(device: torch.device) -> None:
    """A fixed decode grid larger than the step's contexts gives the same result."""
    batch = build_paged_batch([1, 1], [50, 3], 4, 2, 64, block_size=8).to(device)
    scale = 0.125
    args = (batch.query, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens)
    args = (*args, batch.block_tables, scale, batch.num_decodes, batch.query_lens)
    free = paged_attention_triton(*args, batch.seq_lens_list, tiling=SMALL)
    fixed = paged_attention_triton(*args, batch.seq_lens_list, tiling=SMALL, max_decode_seq_len=256)
    torch.testing.assert_close(free, fixed, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exceeds max_decode_seq_len"):
        paged_attention_triton(*args, batch.seq_lens_list, tiling=SMALL, max_decode_seq_len=32)


@st.composite
def ragged_batches(draw: st.DrawFn) -> PagedBatch:
    num_decodes = draw(st.integers(0, 3))
    num_prefills = draw(st.integers(0 if num_decodes else 1, 3))
    query_lens, seq_lens = [], []
    for _ in range(num_decodes):
        query_lens.append(1)
        seq_lens.append(draw(st.integers(1, 90)))
    for _ in range(num_prefills):
        q = draw(st.integers(2, 20))
        query_lens.append(q)
        seq_lens.append(q + draw(st.integers(0, 40)))
    kv_heads = draw(st.sampled_from([1, 2]))
    return build_paged_batch(
        query_lens,
        seq_lens,
        num_q_heads=kv_heads * draw(st.sampled_from([1, 2, 4, 8])),
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([32, 64])),
        block_size=draw(st.sampled_from([4, 8, 16])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ragged_batches())
def test_ragged_batches_property(batch: PagedBatch, device: torch.device) -> None:
    assert_close(*run_both(batch, device), torch.float32)
