"""The Triton backend: paged attention and KV-cache writes as Triton kernels (CUDA; interpreter on CPU)."""

from __future__ import annotations

import torch

from engine_worker.engine.attention.metadata import AttentionMetadata
from jetserve_kernels.kv_cache_write import write_kv_cache_triton
from jetserve_kernels.paged_attention import PagedAttentionTiling, paged_attention_triton
from jetserve_kernels.triton_utils import HAS_TRITON


class TritonAttentionBackend:
    """Same contract as ``TorchAttentionBackend``; chosen by 'auto' on CUDA.

    ``max_decode_seq_len`` and a fixed ``tiling.decode_partition_size`` make the decode
    launch grid independent of the step's lengths, which CUDA-graph replay requires.
    """

    name = "triton"

    def __init__(
        self,
        tiling: PagedAttentionTiling | None = None,
        max_decode_seq_len: int | None = None,
    ) -> None:
        if not HAS_TRITON:
            raise RuntimeError(
                "attention backend 'triton' needs the triton package; use 'torch' or 'auto'"
            )
        self.tiling = tiling or PagedAttentionTiling()
        self.max_decode_seq_len = max_decode_seq_len

    write_kv = staticmethod(write_kv_cache_triton)  # the kernel has the method's signature

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention_triton(
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
            tiling=self.tiling,
            max_decode_seq_len=self.max_decode_seq_len,
        )
