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
