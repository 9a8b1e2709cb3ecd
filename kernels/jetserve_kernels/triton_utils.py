"""Guarded Triton import and a kernel handle that checks the launch device against Triton's mode.

The CPU path never needs Triton, so the package must import without it: kernels are
plain Python functions wrapped in ``DeviceKernel`` and handed to ``triton.jit`` at their
first launch. Triton reads ``TRITON_INTERPRET`` when it is imported (its own library
functions such as ``tl.sum`` are decorated then), so on a host without CUDA this module
defaults the variable to 1 before importing Triton: the interpreter is the only way
Triton can run there, and the default makes that hold whatever imports Triton first.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: references work, Triton kernels refuse to launch
    triton = None
    tl = None

HAS_TRITON = triton is not None


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


class DeviceKernel:
    """A Triton kernel body, decorated with ``triton.jit`` on first launch."""

    def __init__(self, fn: Callable[..., Any], do_not_specialize: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.do_not_specialize = do_not_specialize
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def _launchable(self) -> Any:
        return triton.jit(self.fn, do_not_specialize=list(self.do_not_specialize))

    def on(self, device: torch.device) -> Any:
        """The launchable kernel for tensors on ``device``; index it with the grid."""
        if triton is None:
            raise RuntimeError(
                f"{self.fn.__name__} needs Triton, which is not installed; "
                "install the 'triton' extra or use the torch reference backend"
            )
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"{self.fn.__name__} got {device.type} tensors but Triton compiles for CUDA: "
                "set TRITON_INTERPRET=1 before Triton is imported to run it in the interpreter"
            )
        return self._launchable


def device_kernel(
    fn: Callable[..., Any] | None = None, *, do_not_specialize: tuple[str, ...] = ()
) -> Any:
    """Decorator for Triton kernel bodies in modules that must import without Triton.

    ``do_not_specialize`` names integer arguments that vary from step to step (offsets,
    table widths): Triton would otherwise compile a new variant when one happens to be 1
    or a multiple of 16, mid-serving or during CUDA-graph capture.
    """
    if fn is None:
        return functools.partial(DeviceKernel, do_not_specialize=do_not_specialize)
    return DeviceKernel(fn, do_not_specialize)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device (a stand-in on the CPU) for grid sizing."""
    if device.type != "cuda":
        return 8
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


__all__ = [
    "HAS_TRITON",
    "DeviceKernel",
    "cdiv",
    "device_kernel",
    "interpreter_enabled",
    "next_power_of_2",
    "num_sms",
    "tl",
    "triton",
]
