"""Small per-step tensors built on the host (token ids, positions, block tables, sampling
parameters) and sent to the device without waiting for it."""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """On CUDA a copy from pinned memory, queued behind the work already launched instead of
    waiting for it: under async scheduling the next step's inputs and sampling parameters
    are built while the device still runs the step before."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
