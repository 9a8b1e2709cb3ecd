"""Triton paged attention against the torch reference on mixed decode/prefill batches.
Random ragged batches (a hypothesis sweep in the interpreter, seconds):
tests/integration/kernels/test_paged_attention_property.py."""

from __future__ import annotations

import pytest
import torch

from jetserve_kernels.paged_attention import PagedAttentionTiling, paged_attention_triton
from tests.support.paged_batch import SMALL, assert_close, build_paged_batch, run_both


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
