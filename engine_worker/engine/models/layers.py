"""The norm, rotary, matmul, activation and greedy-argmax functions a model (and its
sampler) calls: torch references, or fused Triton or C++ kernels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F

from engine_worker.engine.sampler import torch_argmax
from jetserve_kernels.cpu.ops import silu_and_mul_ref
from jetserve_kernels.rms_norm import rms_norm_ref
from jetserve_kernels.rotary import rotary_ref


@dataclass(frozen=True)
class LayerOps:
    rms_norm: Callable = rms_norm_ref
    rotary: Callable = rotary_ref
    linear: Callable = F.linear  # (x, weight, bias) -> y, what the model's Linears call
    silu_and_mul: Callable = silu_and_mul_ref  # [..., 2I] gate_up -> silu(gate) * up
    argmax: Callable = torch_argmax  # logits [rows, vocab] -> greedy tokens [rows]
    # weight -> the matmul its Linear calls once loaded (None: keep `linear`)
    matmul_for: Callable | None = None


def layer_ops_for(backend_name: str) -> LayerOps:
    """The Triton and CPU backends bring their fused kernels along; the reference keeps
    torch ops."""
    if backend_name == "cpu":
        from jetserve_kernels.cpu.ops import (
            greedy_argmax_cpu,
            linear_cpu,
            rms_norm_cpu,
            rotary_cpu,
            silu_and_mul_cpu,
        )
        from jetserve_kernels.cpu.packed_matmul import matmul_for

        return LayerOps(
            rms_norm=rms_norm_cpu,
            rotary=rotary_cpu,
            linear=linear_cpu,
            silu_and_mul=silu_and_mul_cpu,
            argmax=greedy_argmax_cpu,
            matmul_for=matmul_for,
        )
    if backend_name == "triton":
        from jetserve_kernels.rms_norm import rms_norm_triton
        from jetserve_kernels.rotary import rotary_triton

        return LayerOps(rms_norm=rms_norm_triton, rotary=rotary_triton)
    return LayerOps()
