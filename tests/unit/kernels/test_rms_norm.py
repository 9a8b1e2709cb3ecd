"""Triton fused RMSNorm (+ residual add) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from jetserve_kernels.rms_norm import rms_norm_ref, rms_norm_triton

# bf16 gets one rounding step of slack: the interpreter truncates fp32->bf16 where torch rounds.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(dtype: torch.dtype, hidden: int, with_residual: bool, device) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=g).to(dtype)
    residual = torch.randn(7, hidden, generator=g).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    x_in = x.clone()
    ref, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    out, new_residual = rms_norm_triton(
        x.to(device),
        weight.to(device),
        1e-5,
        residual.to(device) if residual is not None else None,
    )
    assert out.dtype == ref.dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=tol, rtol=tol)
    if with_residual:
        torch.testing.assert_close(
            new_residual.cpu().float(), ref_residual.float(), atol=tol, rtol=tol
        )
    else:
        assert new_residual is None
    torch.testing.assert_close(x, x_in, atol=0, rtol=0)  # inputs untouched


def test_fp32_weight_promotes_like_reference(device) -> None:
    """A half-precision activation with an fp32 weight comes out fp32, as in the reference."""
    x = torch.randn(3, 128).half()
    weight = torch.rand(128) + 0.5
    ref, _ = rms_norm_ref(x, weight, 1e-6)
    out, _ = rms_norm_triton(x.to(device), weight.to(device), 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=1e-6)


def test_leading_dims_and_empty(device) -> None:
    x = torch.randn(2, 3, 64)
    weight = torch.randn(64)
    ref, _ = rms_norm_ref(x, weight, 1e-6)
    out, _ = rms_norm_triton(x.to(device), weight.to(device), 1e-6)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=1e-6)
    empty, _ = rms_norm_triton(torch.empty(0, 64, device=device), weight.to(device), 1e-6)
    assert empty.shape == (0, 64)
