"""The interface every attention backend implements, and the choice between them."""

from __future__ import annotations

from typing import Protocol

import torch

from engine_worker.engine.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Writes a step's new K/V into the paged cache and attends over it.

    Caches are ``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer.
    """

    name: str

    def write_kv(
        self,
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # int64 [T]
    ) -> None: ...

    def forward(
        self,
        query: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        ...


BACKENDS = ("torch", "cpu", "triton")


def resolve_backend_name(name: str, device: torch.device) -> str:
    """'auto' takes Triton on CUDA; on the CPU the C++ kernels where this host can build
    them (a C++ compiler and ninja), else the torch reference."""
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        from jetserve_kernels.cpu.ops import available

        return "cpu" if device.type == "cpu" and available() else "torch"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose 'auto', {', '.join(map(repr, BACKENDS))}"
        )
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"attention backend 'cpu' runs on the CPU, not on {device.type}")
    return name


def select_backend(
    name: str, device: torch.device, max_decode_seq_len: int | None = None
) -> AttentionBackend:
    """`max_decode_seq_len` fixes the Triton decode grid so decode steps can be captured
    in CUDA graphs.
    """
    name = resolve_backend_name(name, device)
    if name == "torch":
        from engine_worker.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "cpu":
        from engine_worker.engine.attention.cpu_backend import CpuAttentionBackend

        return CpuAttentionBackend()
    from engine_worker.engine.attention.triton_backend import TritonAttentionBackend
    from jetserve_kernels.paged_attention import PagedAttentionTiling

    if max_decode_seq_len is None:
        return TritonAttentionBackend()
    return TritonAttentionBackend(
        tiling=PagedAttentionTiling(decode_partition_size=512),
        max_decode_seq_len=max_decode_seq_len,
    )
