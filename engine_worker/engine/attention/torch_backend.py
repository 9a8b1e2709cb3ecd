"""The reference backend: plain torch ops, used on the CPU."""

from __future__ import annotations

import torch

from engine_worker.engine.attention.metadata import AttentionMetadata
from jetserve_kernels.kv_cache_write import write_kv_cache_ref
from jetserve_kernels.paged_attention import paged_attention_ref


class TorchAttentionBackend:
    name = "torch"

    write_kv = staticmethod(write_kv_cache_ref)  # the kernel has the method's signature

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention_ref(
            query,
            k_cache,
            v_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            scale,
            num_decodes=meta.num_decodes,
            query_lens_cpu=meta.query_lens_cpu,
            seq_lens_cpu=meta.seq_lens_cpu,
        )
