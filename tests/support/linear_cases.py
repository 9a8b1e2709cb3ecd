"""Random Linear problems for the matmul kernels' property tests: one draw, any kernel."""

from __future__ import annotations

import torch


def random_linear(
    rows: int, cols: int, out: int, bias: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x [rows, cols], weight [out, cols], bias [out] or None), seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    w = torch.randn(out, cols, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return x, w, b
