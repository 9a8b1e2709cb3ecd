"""The model's projections: one Linear class, so that weight-only quantization
(quantization.py) swaps it after loading and tensor parallelism can shard or wrap it,
without either touching the model code."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b), W [out_features, in_features] as in Hugging Face checkpoints."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        matmul: Callable[..., torch.Tensor] = F.linear,
    ) -> None:
        """`matmul` has ``F.linear``'s signature: the CPU backend's picks a weight-streaming
        kernel for decode-sized inputs (models/layers.py)."""
        super().__init__()
        self.matmul = matmul
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, bias={self.bias is not None}"


def bind_weight_matmuls(
    model: nn.Module, matmul_for: Callable[[torch.Tensor], Callable[..., torch.Tensor]]
) -> None:
    """Give each plain Linear of a loaded (and maybe quantized) model the matmul
    `matmul_for` makes for its weight: the CPU backend packs fp32 weights once here
    (kernels/jetserve_kernels/cpu/packed_matmul.py). Quantized Linears are other classes and keep theirs.
    Weights are taken as they are now: code that changes them later through ``.data``
    (which torch does not count as a change) must bind them again."""
    for module in model.modules():
        if type(module) is Linear:
            module.matmul = matmul_for(module.weight)
