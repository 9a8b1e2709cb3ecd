"""Weight-only quantization of every Linear, applied after an ordinary checkpoint loads.

Each output channel (row of W) gets one scale: int8 stores round(W / s) with
s = max|row| / 127; fp8 stores W / s as float8 e4m3 with s = max|row| / 448. Activations
stay in the model's dtype. Under tensor parallelism a row-parallel Linear holds a slice of
each row's columns: its row maxima are taken over all ranks (an all-reduce of max), so
every rank stores its slice of the very weight one rank would, and TP=N decodes what
TP=1 decodes. A decode step streams every weight once, so a quarter of the
bytes (int8 against fp32) is what makes batch-1 decoding faster.

Kernels: int8 on the CPU goes through the C++ kernel of kernels/jetserve_kernels/cpu/ (a decode batch) or
a dequantized matmul (a prefill); on CUDA the weight is widened in the matmul's dtype.
fp8 uses ``torch._scaled_mm`` on GPUs with fp8 tensor cores (compute capability 8.9+)
and dequantizes elsewhere (the CPU path exists to test it, not to be fast).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine_worker.engine.models.linear import Linear

log = logging.getLogger(__name__)

METHODS = ("int8", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# The CPU int8 kernel streams the weight once per call for up to this many rows of x.
CPU_KERNEL_MAX_ROWS = 16
# Up to this many rows, one streaming pass per 16 rows still beats widening the whole
# weight to fp32 for one matmul (this 2-core x86_64 box, 64 rows: LM head [32000, 512]
# 23 vs 97 ms, gate_up 2.3 vs 5.4 ms; about even at 256-512 rows, widening wins past).
CPU_KERNEL_CHUNKED_MAX_ROWS = 256


# Turns a Linear's local row maxima into the whole weight's (under tensor parallelism).
RowMax = Callable[[torch.Tensor], torch.Tensor]


def row_amax(weight: torch.Tensor) -> torch.Tensor:
    """max |W| of each output channel, fp32 [out]."""
    return weight.detach().float().abs().amax(dim=1)


def _row_scales(weight: torch.Tensor, limit: float, amax: torch.Tensor | None) -> torch.Tensor:
    """One fp32 scale per output channel; an all-zero row gets scale 1."""
    if amax is None:
        amax = row_amax(weight)
    return torch.where(amax > 0, amax / limit, torch.ones_like(amax))


def quantize_int8(
    weight: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], fp32 scales [out]) with W ~= q * s[:, None]; `amax` overrides the
    row maxima (a row-parallel slice's are those of the whole row)."""
    scales = _row_scales(weight, INT8_MAX, amax)
    q = torch.round(weight.float() / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8).contiguous(), scales


def quantize_fp8(
    weight: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [out, in], fp32 scales [out]) with W ~= q * s[:, None]."""
    scales = _row_scales(weight, FP8_MAX, amax)
    q = (weight.float() / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn).contiguous(), scales


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored quantized with per-output-channel scales."""

    method: str = ""

    def __init__(
        self, linear: Linear, quantize: Callable, amax: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight, scales = quantize(linear.weight.data, amax)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the model's dtype would hold it (the reference tests compare to)."""
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.method}, per-channel scales"


class Int8Linear(QuantizedLinear):
    method = "int8"

    def __init__(self, linear: Linear, amax: torch.Tensor | None = None) -> None:
        super().__init__(linear, quantize_int8, amax)
        self._cpu_kernel = None
        if self.qweight.device.type == "cpu":
            from jetserve_kernels.cpu.build import cpu_ops

            ops = cpu_ops()
            self._cpu_kernel = None if ops is None else ops.int8_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if self._cpu_kernel is not None and rows <= CPU_KERNEL_CHUNKED_MAX_ROWS:
            x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
            if rows <= CPU_KERNEL_MAX_ROWS:
                y = self._cpu_kernel(x2, self.qweight, self.scales)
            else:  # each row's result is the same whichever chunk it is in
                y = torch.cat(
                    [
                        self._cpu_kernel(x2[i : i + CPU_KERNEL_MAX_ROWS], self.qweight, self.scales)
                        for i in range(0, rows, CPU_KERNEL_MAX_ROWS)
                    ]
                )
        elif x.device.type == "cpu":
            y = F.linear(x2, self.dequantized(x.dtype))
        else:  # CUDA: widen in the matmul's dtype, scale the output channels after
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return self._add_bias(y).reshape(*shape[:-1], self.out_features)


def _has_fp8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(QuantizedLinear):
    method = "fp8"

    def __init__(self, linear: Linear, amax: torch.Tensor | None = None) -> None:
        super().__init__(linear, quantize_fp8, amax)
        self._scaled_mm = _has_fp8_matmul(self.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self._scaled_mm:
            y = self._fp8_matmul(x2)
        else:
            y = F.linear(x2, self.dequantized(x.dtype))
        return self._add_bias(y).reshape(*shape[:-1], self.out_features)

    def _fp8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Activations quantized per row to e4m3 on the fly, weights per column: both scale
        vectors go to ``torch._scaled_mm`` (row-wise scaling)."""
        x_scales = x.detach().float().abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / FP8_MAX
        x8 = (x.float() / x_scales).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch._scaled_mm(
            x8,
            self.qweight.t(),
            scale_a=x_scales,
            scale_b=self.scales[None, :],
            out_dtype=x.dtype,
        )


QUANTIZED: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "fp8": Fp8Linear}


def quantize_model(
    model: nn.Module,
    method: str,
    whole_row_amax: Callable[[str], RowMax | None] | None = None,
) -> int:
    """Swap every ``Linear`` under `model` for its `method` form, in place; returns how many.

    `whole_row_amax(name)` gives, for a Linear that holds only part of each row (a
    tensor-parallel row-parallel slice), what turns its row maxima into the whole row's;
    None for the others. Every rank visits the Linears in the same order, so collectives
    it makes line up."""
    if method not in QUANTIZED:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    cls = QUANTIZED[method]
    swapped, device = 0, torch.device("cpu")
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                full = f"{prefix}.{name}" if prefix else name
                reduce = whole_row_amax(full) if whole_row_amax is not None else None
                amax = None if reduce is None else reduce(row_amax(child.weight.data))
                device = child.weight.device
                setattr(parent, name, cls(child, amax))
                swapped += 1
    if method == "fp8" and swapped and not _has_fp8_matmul(device):
        log.warning(
            "fp8 weights on %s: no fp8 matmul here, so every matmul widens its weight first "
            "and runs slower than without quantization; fp8 is for GPUs of compute "
            "capability 8.9+ (use --quantization int8 on this device)",
            device,
        )
    return swapped
