"""Rank 0's step inputs, sent to the other ranks so each runs the same forward on its shard.

Generic over the inputs' dataclasses: tensors are pulled out into one flat buffer per
dtype (one broadcast each), everything else (ints, host lists, the classes themselves)
travels as a small pickled skeleton. A field added to the step inputs later travels
without a change here. `None` in place of inputs tells the ranks to stop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from engine_worker.engine.parallel.group import TensorParallel


@dataclass(frozen=True)
class _Slot:
    """Where a tensor sits in its dtype's flat buffer."""

    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]


def _strip(obj: Any, buckets: dict[torch.dtype, list[torch.Tensor]]) -> Any:
    if isinstance(obj, torch.Tensor):
        bucket = buckets.setdefault(obj.dtype, [])
        offset = sum(t.numel() for t in bucket)
        bucket.append(obj.reshape(-1))
        return _Slot(obj.dtype, offset, tuple(obj.shape))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: _strip(getattr(obj, f.name), buckets) for f in dataclasses.fields(obj) if f.init
        }
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple | list) and any(
        isinstance(x, torch.Tensor) or dataclasses.is_dataclass(x) for x in obj
    ):
        return type(obj)(_strip(x, buckets) for x in obj)
    return obj


def _fill(obj: Any, flats: dict[torch.dtype, torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        numel = 1
        for n in obj.shape:
            numel *= n
        return flats[obj.dtype][obj.offset : obj.offset + numel].view(obj.shape)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: _fill(getattr(obj, f.name), flats) for f in dataclasses.fields(obj) if f.init
        }
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple | list) and any(
        isinstance(x, _Slot) or dataclasses.is_dataclass(x) for x in obj
    ):
        return type(obj)(_fill(x, flats) for x in obj)
    return obj


def send_step(tp: TensorParallel, inputs: Any) -> None:
    """Rank 0: broadcast this step's inputs (a dataclass of tensors and host values)."""
    buckets: dict[torch.dtype, list[torch.Tensor]] = {}
    skeleton = _strip(inputs, buckets)
    sizes = [(dtype, sum(t.numel() for t in ts)) for dtype, ts in buckets.items()]
    tp.broadcast_object((skeleton, sizes))
    for dtype, _ in sizes:
        tp.broadcast(torch.cat(buckets[dtype]).to(tp.device))


def send_stop(tp: TensorParallel) -> None:
    tp.broadcast_object(None)


def receive_step(tp: TensorParallel) -> Any | None:
    """Other ranks: the next step's inputs, rebuilt on this rank's device; None: stop."""
    message = tp.broadcast_object()
    if message is None:
        return None
    skeleton, sizes = message
    flats = {
        dtype: tp.broadcast(torch.empty(total, dtype=dtype, device=tp.device))
        for dtype, total in sizes
    }
    return _fill(skeleton, flats)
