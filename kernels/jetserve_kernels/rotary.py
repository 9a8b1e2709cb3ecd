"""Rotary position embedding (neox/HF rotate-half layout), incl. llama3 frequency scaling."""

from __future__ import annotations

import math

import torch

from jetserve_kernels.triton_utils import device_kernel, next_power_of_2, tl


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with llama3 scaling when configured."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not rope_scaling:
        return inv_freq
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind != "llama3":
        raise ValueError(
            f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3"
        )
    factor = float(rope_scaling["factor"])
    low = float(rope_scaling.get("low_freq_factor", 1.0))
    high = float(rope_scaling.get("high_freq_factor", 4.0))
    old_ctx = float(rope_scaling["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, rope_scaling: dict | None = None
) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos in the first half, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, rope_scaling)
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    xf1, xf2 = x1.float(), x2.float()
    return torch.cat([xf1 * cos - xf2 * sin, xf2 * cos + xf1 * sin], dim=-1).to(x.dtype)


def rotary_ref(
    positions: torch.Tensor,  # int64 [T]
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_positions, D] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated (query, key); inputs are left untouched."""
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


@device_kernel
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    num_q_heads,
    num_kv_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """One program per token rotates all its query and key heads with one cos/sin row."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=i < half, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + i, mask=i < half, other=0.0)
    head_dim = 2 * half

    hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = (hq < num_q_heads) & (i < half)
    src = q_ptr + t * stride_qt + hq * stride_qh + i
    x1 = tl.load(src, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mq, other=0.0).to(tl.float32)
    dst = q_out_ptr + (t * num_q_heads + hq) * head_dim + i
    tl.store(dst, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mq)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mq)

    hk = tl.arange(0, BLOCK_HK)[:, None]
    mk = (hk < num_kv_heads) & (i < half)
    src = k_ptr + t * stride_kt + hk * stride_kh + i
    x1 = tl.load(src, mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mk, other=0.0).to(tl.float32)
    dst = k_out_ptr + (t * num_kv_heads + hk) * head_dim + i
    tl.store(dst, (x1 * cos - x2 * sin).to(k_out_ptr.dtype.element_ty), mask=mk)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(k_out_ptr.dtype.element_ty), mask=mk)


def rotary_triton(
    positions: torch.Tensor,  # int64 [T]
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_positions, D] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``rotary_ref``: query and key of a token rotated in one program."""
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    half = cos_sin_cache.shape[-1] // 2
    if 2 * half != head_dim:
        raise ValueError(f"cos/sin cache is for head dim {2 * half}, query has {head_dim}")
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return q_out, k_out
    _rotary_kernel.on(query.device)[(num_tokens,)](
        positions,
        query,
        key,
        cos_sin_cache,
        q_out,
        k_out,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_kv_heads,
        half,
        BLOCK_HQ=next_power_of_2(num_q_heads),
        BLOCK_HK=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(half),
    )
    return q_out, k_out
