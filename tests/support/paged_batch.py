"""Builds a flattened mixed batch over a paged KV cache, the way the model runner lays one out,
and runs the Triton paged attention on it beside the fp32 torch reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jetserve_kernels.paged_attention import (
    PagedAttentionTiling,
    paged_attention_ref,
    paged_attention_triton,
)


@dataclass
class PagedBatch:
    query: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]: slots of the new tokens
    num_decodes: int
    query_lens: list[int]
    seq_lens_list: list[int]

    def to(self, device: torch.device) -> PagedBatch:
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in self.__dict__.items()
        }
        return PagedBatch(**moved)


def build_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedBatch:
    """Decodes are the leading sequences with query length 1 (the metadata contract).

    Physical blocks are a random permutation so block-table indirection is really tested;
    spare blocks hold garbage that a correct kernel never reads.
    """
    assert len(query_lens) == len(seq_lens)
    assert all(0 < q <= s for q, s in zip(query_lens, seq_lens, strict=True))
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    physical = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor(physical[used : used + n], dtype=torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    query = torch.randn(sum(query_lens), num_q_heads, head_dim, generator=g).to(dtype)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    slots = []
    for b, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        for pos in range(s - q, s):
            block = int(block_tables[b, pos // block_size])
            slots.append(block * block_size + pos % block_size)
    return PagedBatch(
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        num_decodes=num_decodes,
        query_lens=list(query_lens),
        seq_lens_list=list(seq_lens),
    )


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
