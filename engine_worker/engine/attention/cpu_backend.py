"""The CPU backend: C++ kernels that read the paged cache block by block (kernels/jetserve_kernels/cpu/)."""

from __future__ import annotations

import torch

from engine_worker.engine.attention.metadata import AttentionMetadata
from jetserve_kernels.cpu.ops import (
    available,
    paged_attention_cpu,
    rotary_write_kv_cpu,
    write_kv_cache_cpu,
)


class CpuAttentionBackend:
    """Same contract as ``TorchAttentionBackend``, chosen by 'auto' on a CPU that can build
    the kernels. The reference gathers each decode's context into a padded copy per layer;
    this one reads K/V in place through the block table with an online softmax."""

    name = "cpu"

    def __init__(self) -> None:
        if not available():
            raise RuntimeError(
                "attention backend 'cpu' needs a C++ compiler and ninja to build its kernels; "
                "use 'torch' or 'auto'"
            )

    write_kv = staticmethod(write_kv_cache_cpu)  # the kernel has the method's signature

    # Optional in the backend contract: rotary and the cache write in one kernel call,
    # straight from the qkv rows, returning the rotated q (the model takes it where a
    # backend has it, models/llama.py).
    rotary_write_kv = staticmethod(rotary_write_kv_cpu)

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention_cpu(
            query,
            k_cache,
            v_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            scale,
        )
