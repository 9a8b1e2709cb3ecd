"""The norm, rotary and matmul functions a model calls: torch references, or fused Triton or C++ kernels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F

from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_ref


@dataclass(frozen=True)
class LayerOps:
    rms_norm: Callable = rms_norm_ref
    rotary: Callable = rotary_ref
    linear: Callable = F.linear  # (x, weight, bias) -> y, what the model's Linears call


def layer_ops_for(backend_name: str) -> LayerOps:
    """The Triton and CPU backends bring their fused kernels along; the reference keeps
    torch ops."""
    if backend_name == "cpu":
        from kernels.cpu.ops import linear_cpu, rms_norm_cpu, rotary_cpu

        return LayerOps(rms_norm=rms_norm_cpu, rotary=rotary_cpu, linear=linear_cpu)
    if backend_name == "triton":
        from kernels.rms_norm import rms_norm_triton
        from kernels.rotary import rotary_triton

        return LayerOps(rms_norm=rms_norm_triton, rotary=rotary_triton)
    return LayerOps()
