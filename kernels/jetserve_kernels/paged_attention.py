"""Paged attention over block tables for a mixed batch of decodes and prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jetserve_kernels.triton_utils import (
    cdiv,
    device_kernel,
    interpreter_enabled,
    next_power_of_2,
    num_sms,
    tl,
)


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


@device_kernel(do_not_specialize=("seq_offset", "stride_bt", "partition_size", "num_partitions"))
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    seq_offset,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    block_size,
    num_q_heads,
    head_dim,
    partition_size,
    num_partitions,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax attention of BLOCK_Q query tokens x the GROUP q heads of one kv head.

    Rows of the tile are (token, head-in-group) pairs, so K/V tiles gathered through the
    block table are loaded once per kv head. Grid: (sequence, query block, kv head x
    partition). With SPLIT the program covers one partition of the context and writes
    unnormalised partials (acc, running max, running sum) for ``_reduce_partitions_kernel``.
    """
    seq_local = tl.program_id(0)
    seq = seq_offset + seq_local
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2) // num_partitions
    part = tl.program_id(2) % num_partitions

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    first_tok = q_block * BLOCK_Q
    kv_lo = part * partition_size
    if (first_tok < q_len) & (kv_lo < seq_len):
        rows = tl.arange(0, BLOCK_Q * GROUP_P2)
        tok = first_tok + rows // GROUP_P2
        g = rows % GROUP_P2
        head = kv_head * GROUP + g
        row_ok = (tok < q_len) & (g < GROUP)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        # Causal reach of the last token of this query block bounds the context to read.
        kv_hi = tl.minimum(seq_len, context_len + first_tok + BLOCK_Q)
        if SPLIT:
            kv_hi = tl.minimum(kv_hi, kv_lo + partition_size)
        q_pos = context_len + tok  # absolute position of each row's token

        m_i = tl.full([BLOCK_Q * GROUP_P2], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP_P2], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_P2, BLOCK_D], dtype=tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for start in range(kv_lo, kv_hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pos_ok = pos < kv_hi
            block = tl.load(table + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
            slot = block * stride_cb + (pos % block_size) * stride_cs + kv_head * stride_ch
            kv_offsets = slot[:, None] + d[None, :]
            kv_mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
            visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if SPLIT:
            part_row = (seq_local * num_q_heads + head).to(tl.int64) * num_partitions + part
            tl.store(part_max_ptr + part_row, m_i, mask=row_ok)
            tl.store(part_sum_ptr + part_row, l_i, mask=row_ok)
            tl.store(
                part_acc_ptr + part_row[:, None] * BLOCK_D + d[None, :],
                acc,
                mask=row_ok[:, None] & d_ok[None, :],
            )
        else:
            out = acc / l_i[:, None]
            tl.store(
                out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & d_ok[None, :],
            )


@device_kernel(do_not_specialize=("partition_size", "num_partitions"))
def _reduce_partitions_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    stride_ot,
    stride_oh,
    num_q_heads,
    head_dim,
    partition_size,
    num_partitions,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merges one decode head's split-K partials: rescale each by exp(max_p - max) and normalise."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    used = (seq_len + partition_size - 1) // partition_size
    p = tl.arange(0, BLOCK_P)
    p_ok = p < used
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    row = (seq * num_q_heads + head).to(tl.int64) * num_partitions + p
    m = tl.load(part_max_ptr + row, mask=p_ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row, mask=p_ok, other=0.0)
    acc = tl.load(
        part_acc_ptr + row[:, None] * BLOCK_D + d[None, :],
        mask=p_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    w = tl.exp2(m - tl.max(m, 0))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(sums * w, 0)
    q_row = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    tl.store(
        out_ptr + q_row * stride_ot + head * stride_oh + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )


@dataclass(frozen=True)
class PagedAttentionTiling:
    """Tile sizes and split-K policy; defaults suit a GPU, tests shrink them to reach edge cases.

    ``decode_partition_size`` fixes the split-K partition (tokens, a multiple of
    ``block_n``); None picks one per call so decode grids fill the device.
    ``prefill_rows`` is the target of query rows (tokens x heads of a group) per tile.
    """

    block_n: int = 64
    prefill_rows: int = 64
    decode_partition_size: int | None = None
    min_partition_size: int = 256
    # 8 warps keep a 64-row x 128-dim prefill tile in registers (no spills on sm_80/sm_90)
    decode_num_warps: int = 4
    prefill_num_warps: int = 8


def _decode_partition_size(
    tiling: PagedAttentionTiling, num_decodes: int, num_kv_heads: int, max_len: int, sms: int
) -> int:
    """Tokens per split-K partition: one partition unless decodes alone leave the device idle."""
    if tiling.decode_partition_size is not None:
        return tiling.decode_partition_size
    whole = cdiv(max(max_len, 1), tiling.block_n) * tiling.block_n
    programs = num_decodes * num_kv_heads
    if programs >= 2 * sms:
        return whole
    wanted = cdiv(2 * sms, programs)
    size = cdiv(cdiv(max_len, wanted), tiling.block_n) * tiling.block_n
    return min(whole, max(size, cdiv(tiling.min_partition_size, tiling.block_n) * tiling.block_n))


def paged_attention_triton(
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
    *,
    tiling: PagedAttentionTiling | None = None,
    max_decode_seq_len: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``paged_attention_ref``: one launch for decodes (split-K over long
    contexts, then a reduction), one for prefill chunks (query blocks, causal per chunk).

    ``max_decode_seq_len`` bounds the decode grid; pass a fixed value (e.g. the model's
    max length) with a fixed ``tiling.decode_partition_size`` to make the launch shapes
    independent of the step, as CUDA-graph capture needs.
    """
    tiling = tiling or PagedAttentionTiling()
    if query_lens_cpu is None:
        query_lens_cpu = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    num_seqs = len(seq_lens_cpu)
    num_tokens, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} kv heads")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with a contiguous head dim")
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_q_heads // num_kv_heads
    group_p2 = next_power_of_2(group)
    block_d = max(16, next_power_of_2(head_dim))
    common = dict(
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_N=tiling.block_n,
        BLOCK_D=block_d,
        # The interpreter multiplies bf16 dot operands as raw bits: compute in fp32 there.
        UPCAST=interpreter_enabled() and query.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    kernel = _paged_attention_kernel.on(query.device)
    shared_args = (query_start_loc, seq_lens, block_tables)
    strides = (
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
    )
    log2e_scale = scale * 1.4426950408889634

    if num_decodes > 0:
        longest = max(seq_lens_cpu[:num_decodes])
        max_len = max_decode_seq_len or longest
        if longest > max_len:
            raise ValueError(f"decode context {longest} exceeds max_decode_seq_len {max_len}")
        sms = num_sms(query.device)
        part_size = _decode_partition_size(tiling, num_decodes, num_kv_heads, max_len, sms)
        if part_size % tiling.block_n:
            raise ValueError("decode_partition_size must be a multiple of block_n")
        num_parts = cdiv(max_len, part_size)
        split = num_parts > 1
        if split:
            part_acc = torch.empty(
                (num_decodes, num_q_heads, num_parts, block_d),
                dtype=torch.float32,
                device=query.device,
            )
            part_max = torch.empty(
                (num_decodes, num_q_heads, num_parts), dtype=torch.float32, device=query.device
            )
            part_sum = torch.empty_like(part_max)
        else:
            part_acc = part_max = part_sum = out
        kernel[(num_decodes, 1, num_kv_heads * num_parts)](
            query,
            k_cache,
            v_cache,
            out,
            part_acc,
            part_max,
            part_sum,
            *shared_args,
            0,
            log2e_scale,
            *strides,
            block_size,
            num_q_heads,
            head_dim,
            part_size,
            num_parts,
            BLOCK_Q=max(1, 16 // group_p2),
            SPLIT=split,
            num_warps=tiling.decode_num_warps,  # the interpreter drops launch options
            **common,
        )
        if split:
            _reduce_partitions_kernel.on(query.device)[(num_decodes, num_q_heads)](
                out,
                part_acc,
                part_max,
                part_sum,
                query_start_loc,
                seq_lens,
                out.stride(0),
                out.stride(1),
                num_q_heads,
                head_dim,
                part_size,
                num_parts,
                BLOCK_P=next_power_of_2(num_parts),
                BLOCK_D=block_d,
            )

    num_prefills = num_seqs - num_decodes
    if num_prefills > 0:
        max_q_len = max(query_lens_cpu[num_decodes:])
        block_q = max(1, tiling.prefill_rows // group_p2)
        max_len = max(seq_lens_cpu[num_decodes:])
        kernel[(num_prefills, cdiv(max_q_len, block_q), num_kv_heads)](
            query,
            k_cache,
            v_cache,
            out,
            out,
            out,
            out,
            *shared_args,
            num_decodes,
            log2e_scale,
            *strides,
            block_size,
            num_q_heads,
            head_dim,
            max_len,
            1,
            BLOCK_Q=block_q,
            SPLIT=False,
            num_warps=tiling.prefill_num_warps,
            **common,
        )
    return out
