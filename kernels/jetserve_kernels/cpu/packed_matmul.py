"""fp32 ``F.linear`` for batches of rows against a weight packed once, at load.

At a decode step of 64 sequences torch's fp32 matmul ran at 50-65 GFLOP/s on one core
of the issue-16 box (~100 GFLOP/s peak): it repacks the [N, K] weight into its own
panel layout on every call, and for 64 rows that copy costs as much as the arithmetic
(the 64 MB LM head was 43% of a step). torch's oneDNN path can keep the weight in the
blocked layout its AVX-512 micro-kernel reads: packed once here, the same matmuls ran at
82-106 GFLOP/s from 4 to 4096 rows (benchmarks/results/cpu_decode_step.json). A decode
step's few rows (up to ``STREAMED_MAX_ROWS``) keep going through decode_linear.cpp,
which streams the plain [N, K] weight faster than either for one to eight rows; the
plain weight therefore stays, and packed Linears hold their weights twice.

bf16 weights (a bf16 model; oneDNN runs them on AMX tiles where the CPU has them) are
packed the same way: a whole decode step's matmuls at 64 rows took 4.4 ms packed against
8.1 ms through F.linear on an AMX box, 3.0 against 5.1 at 16 rows.
"""

from __future__ import annotations

import torch

from jetserve_kernels.cpu.ops import KERNEL_DTYPES, STREAMED_MAX_ROWS, linear_cpu

# The batch the oneDNN layout is chosen for: a full decode step; any row count works.
PACK_FOR_ROWS = 64


def packing_available() -> bool:
    """Whether this torch build has oneDNN and its prepacked-linear ops."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedMatmul:
    """``F.linear``'s signature over one weight, packed when constructed.

    Called with the weight it packed (the same storage, unmodified since), rows beyond a
    decode step's few go through the packed copy; anything else (another weight, one
    changed in place, other dtypes, gradients) takes ``linear_cpu`` unchanged. A write
    through ``weight.data`` bumps no version counter and goes unseen: the model must be
    bound again after one (models/linear.py ``bind_weight_matmuls``).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dtype not in KERNEL_DTYPES or weight.dim() != 2:
            raise ValueError("PackedMatmul packs fp32 or bf16 [N, K] weights")
        self.dtype = weight.dtype
        self.max_streamed = STREAMED_MAX_ROWS[weight.dtype]
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(
                weight.detach().contiguous(), PACK_FOR_ROWS
            )
        self._source = (weight.data_ptr(), weight._version, tuple(weight.shape))

    def packs(self, weight: torch.Tensor) -> bool:
        return (weight.data_ptr(), weight._version, tuple(weight.shape)) == self._source

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        k = x.shape[-1]
        if (
            x.dtype != self.dtype
            or x.numel() <= self.max_streamed * k
            or x.requires_grad
            or not self.packs(weight)
        ):
            return linear_cpu(x, weight, bias)
        flat = x.reshape(-1, k)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])


def matmul_for(weight: torch.Tensor):
    """The matmul a Linear of the CPU backend calls with `weight` once it is loaded: a
    ``PackedMatmul`` for fp32 and bf16 weights where this torch has oneDNN, else
    ``linear_cpu``."""
    if weight.dtype in KERNEL_DTYPES and weight.dim() == 2 and packing_available():
        return PackedMatmul(weight)
    return linear_cpu
