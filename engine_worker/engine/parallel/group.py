"""A rank's view of its tensor-parallel group: who it is, and the collectives it calls.

Two process groups over one TCP store, without torch.distributed's global default group
(so one process may hold several engines, as tests do):
- `control`: rank 0 broadcasts each step's inputs on it; the other ranks wait on it for
  as long as the engine is idle, so its timeout is long.
- `data`: the all-reduces inside a forward pass; every rank is mid-step, so a peer that
  hangs there is an error after `DATA_TIMEOUT`.
gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

CONTROL_TIMEOUT = timedelta(days=365)  # an idle engine's ranks wait this long for a step
DATA_TIMEOUT = timedelta(minutes=5)  # one collective inside a forward pass


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _process_group(
    store: dist.Store, prefix: str, rank: int, size: int, backend: str, timeout: timedelta
) -> Any:
    scoped = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(scoped, rank, size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(scoped, rank, size, options)


@dataclass
class TensorParallel:
    """Rank `rank` of `size`; `device` is where this rank's shard and KV cache live."""

    rank: int
    size: int
    device: torch.device
    control: Any  # torch ProcessGroup
    data: Any  # torch ProcessGroup

    @classmethod
    def join(cls, store: dist.Store, rank: int, size: int, device: torch.device) -> TensorParallel:
        """Every rank calls this with the same store; it returns once all have joined."""
        backend = backend_for(device)
        control = _process_group(store, "control/", rank, size, backend, CONTROL_TIMEOUT)
        data = _process_group(store, "data/", rank, size, backend, DATA_TIMEOUT)
        return cls(rank, size, device, control, data)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (a row-parallel Linear's partial outputs)."""
        self.data.allreduce([tensor]).wait()
        return tensor

    def max_over_ranks_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise max over the ranks, in place (a row-parallel weight's row maxima)."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.data.allreduce([tensor], opts).wait()
        return tensor

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (KV blocks: each rank sized its own cache)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.control.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's (same shape and dtype), in place."""
        self.control.broadcast(tensor, 0).wait()
        return tensor

    def broadcast_object(self, obj: Any = None) -> Any:
        """A small picklable object from rank 0 (the others pass nothing): length, then bytes."""
        if self.is_leader:
            data = pickle.dumps(obj)
            length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
            self.broadcast(length)
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
            self.broadcast(payload)
            return obj
        length = self.broadcast(torch.zeros(1, dtype=torch.int64, device=self.device))
        payload = self.broadcast(
            torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        )
        return pickle.loads(payload.cpu().numpy().tobytes())

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous 1/size of `tensor` along `dim`."""
        return tensor.chunk(self.size, dim)[self.rank]
