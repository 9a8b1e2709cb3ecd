"""Paged attention over block tables for a mixed batch of decodes and prefill chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[num_blocks_used * block_size, Hkv, D] view of one sequence's context, cut to seq_len."""
    block_size = cache.shape[1]
    n_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:seq_len]


def paged_attention_ref(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # int32 [B+1]
    seq_lens: torch.Tensor,  # int32 [B]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    scale: float,
    num_decodes: int = 0,
    query_lens_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    The first ``num_decodes`` sequences have one query token each and are done in one
    padded batched call; prefill chunks go one sequence at a time.
    """
    if query_lens_cpu is None:
        query_lens_cpu = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    gqa = num_q_heads != num_kv_heads
    out = torch.empty_like(query)

    if num_decodes > 0:
        block_size = k_cache.shape[1]
        max_len = max(seq_lens_cpu[:num_decodes])
        n_blocks = (max_len + block_size - 1) // block_size
        table = block_tables[:num_decodes, :n_blocks].long()
        k = k_cache[table].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
        v = v_cache[table].flatten(1, 2).transpose(1, 2)
        positions = torch.arange(k.shape[2], device=query.device)
        mask = positions[None, :] < seq_lens[:num_decodes, None].to(positions.dtype)
        q = query[:num_decodes].unsqueeze(2)  # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=gqa,
        )
        out[:num_decodes] = o.squeeze(2)

    start = num_decodes  # decodes own exactly one row each
    for b in range(num_decodes, len(seq_lens_cpu)):
        q_len, seq_len = query_lens_cpu[b], seq_lens_cpu[b]
        q = query[start : start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        k = _gather_context(k_cache, block_tables[b], seq_len).transpose(0, 1).to(q.dtype)
        v = _gather_context(v_cache, block_tables[b], seq_len).transpose(0, 1).to(q.dtype)
        ctx = seq_len - q_len
        rows = torch.arange(q_len, device=query.device)[:, None] + ctx
        cols = torch.arange(seq_len, device=query.device)[None, :]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=cols <= rows, scale=scale, enable_gqa=gqa
        )
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out.view(-1, num_q_heads, head_dim)
