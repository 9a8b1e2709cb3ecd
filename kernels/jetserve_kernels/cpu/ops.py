"""Python faces of the C++ CPU kernels, with the signatures of the torch references they
replace (``paged_attention_ref``, ``write_kv_cache_ref``, ``rms_norm_ref``, ``rotary_ref``).

Each call goes straight to ``torch.ops.jetserve_cpu``; ``available()`` says whether this
host could build them (kernels/jetserve_kernels/cpu/build.py).
"""

from __future__ import annotations

import torch

from jetserve_kernels.cpu.build import cpu_ops

# Query tokens of one sequence per work item: decodes are one token, a prefill chunk is cut
# in tiles so its rows spread over the threads while each tile reads its K/V blocks once.
PREFILL_TILE_TOKENS = 16


def available() -> bool:
    return cpu_ops() is not None


def _ops():
    ops = cpu_ops()
    if ops is None:
        raise RuntimeError("the C++ CPU kernels are not built on this host; use the torch backend")
    return ops


def paged_attention_cpu(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # int32 [B+1]
    seq_lens: torch.Tensor,  # int32 [B]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    scale: float,
    tile_tokens: int = PREFILL_TILE_TOKENS,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context, reading K/V
    block by block through the table (nothing gathered, nothing padded)."""
    if query.stride(-1) != 1:
        query = query.contiguous()
    return _ops().paged_attention(
        query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, tile_tokens
    )


def write_kv_cache_cpu(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T]; negative slots are skipped
) -> None:
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _ops().write_kv(key, value, k_cache, v_cache, slot_mapping)


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normed, x + residual) as ``rms_norm_ref``, in one pass over each row."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = _ops().rms_norm(x, weight, eps, residual)
    return (out[0], out[1]) if residual is not None else (out[0], None)


def rotary_cpu(
    positions: torch.Tensor,  # int64 [T]
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_positions, D] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (query, key) as new contiguous tensors; the inputs are left untouched."""
    q, k = _ops().rotary(positions, query, key, cos_sin_cache)
    return q, k


def rotary_write_kv_cpu(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D], the fused projection's output
    positions: torch.Tensor,  # int64 [T]
    cos_sin: torch.Tensor,  # [max_positions, D] fp32
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T]; negative slots are skipped
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """``rotary_cpu`` on q and k, then ``write_kv_cache_cpu`` of k and v, in one call
    (qkv_cache.cpp); returns the rotated q [T, Hq, D]."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return _ops().rotary_write_kv(
        qkv, positions, cos_sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads
    )


# Rows of x up to which decode_linear beats torch's matmul (1 thread, issue-16 shapes:
# 1.9x at one row, 1.3x at eight, a tie at sixteen where the matmul's blocking pays).
DECODE_LINEAR_MAX_ROWS = 8


# Rows of x up to which decode_linear beats torch's matmul, per weight dtype it streams (a
# bf16 weight takes bf16 rows of x: a bf16 model). bf16 on an AMX box: 1.6-2.2x oneDNN at
# one row, 1.1-1.2x at four, behind from eight, where the tiles pay off. Its keys are the
# dtypes the CPU kernels take (streamed, packed, SiLU).
STREAMED_MAX_ROWS = {torch.float32: DECODE_LINEAR_MAX_ROWS, torch.bfloat16: 4}
KERNEL_DTYPES = tuple(STREAMED_MAX_ROWS)


def decode_linear_cpu(
    x: torch.Tensor,  # [M, K] in the weight's dtype, M a decode batch
    weight: torch.Tensor,  # fp32 or bf16 [N, K], contiguous
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` for a few rows: one in-order pass over the weight (decode_linear.cpp)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _ops().decode_linear(x, weight, bias)


def linear_cpu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear``, through ``decode_linear_cpu`` when x has a decode step's few rows."""
    if (
        weight.dtype == x.dtype
        and x.numel() <= STREAMED_MAX_ROWS.get(x.dtype, 0) * x.shape[-1]
        and weight.is_contiguous()
        and not (x.requires_grad or weight.requires_grad)
    ):
        y = decode_linear_cpu(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


def decode_layer_cpu(
    x: torch.Tensor,  # [T, hidden]
    residual: torch.Tensor | None,
    weights: list[torch.Tensor],  # input norm, qkv, o_proj, post norm, gate_up, down
    packed: list[torch.Tensor],  # prepacked qkv, o_proj, gate_up, down; empty where none
    eps: float,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,  # AttentionMetadata
    num_heads: int,
    num_kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer in one call (decode_layer.cpp): the kernels the layer's modules
    call one by one, chained in C++; (MLP output, residual), the same bits."""
    out = _ops().decode_layer(
        x, residual, weights, packed, STREAMED_MAX_ROWS[x.dtype], eps, positions, cos_sin,
        k_cache, v_cache, meta.slot_mapping, meta.query_start_loc, meta.seq_lens,
        meta.block_tables, num_heads, num_kv_heads, scale, PREFILL_TILE_TOKENS,
    )  # fmt: skip
    return out[0], out[1]


def silu_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [T, 2I] gate_up output in one pass (activation.cpp; fp32,
    or bf16 rounded as the torch ops round it); other dtypes or a tensor that needs
    gradients take the torch ops."""
    if gate_up.dtype not in KERNEL_DTYPES or gate_up.requires_grad:
        return silu_and_mul_ref(gate_up)
    flat = gate_up.reshape(-1, gate_up.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return _ops().silu_and_mul(flat).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def greedy_argmax_cpu(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` (first index on ties, NaN largest) for fp32 [rows, vocab]
    logits, vectorised (sampling.cpp); torch's argmax is 17x slower than its amax here."""
    if logits.dtype != torch.float32 or logits.dim() != 2:
        return logits.argmax(dim=-1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _ops().greedy_argmax(logits)
