"""The Triton attention backend: chosen per device, and token-for-token equal in the engine."""

from __future__ import annotations

import pytest
import torch

from engine_worker.engine.attention.backend import select_backend
from engine_worker.engine.attention.metadata import AttentionMetadata
from engine_worker.engine.attention.torch_backend import TorchAttentionBackend
from engine_worker.engine.attention.triton_backend import TritonAttentionBackend
from jetserve_kernels.cpu.ops import available as cpu_kernels_available
from tests.support.paged_batch import build_paged_batch


def test_selection() -> None:
    assert isinstance(select_backend("auto", torch.device("cuda")), TritonAttentionBackend)
    on_cpu = "cpu" if cpu_kernels_available() else "torch"
    assert select_backend("auto", torch.device("cpu")).name == on_cpu
    assert isinstance(select_backend("triton", torch.device("cpu")), TritonAttentionBackend)
    assert isinstance(select_backend("torch", torch.device("cuda")), TorchAttentionBackend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on the CPU"):
        select_backend("cpu", torch.device("cuda"))


def test_backend_matches_torch_backend(device: torch.device) -> None:
    """write_kv then forward through both backends on one mixed step."""
    batch = build_paged_batch([1, 1, 6, 3], [9, 40, 6, 19], 8, 2, 64, block_size=8)
    new_k = torch.randn(batch.query.shape[0], 2, 64)
    new_v = torch.randn(batch.query.shape[0], 2, 64)
    meta = AttentionMetadata(
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        block_tables=batch.block_tables,
        slot_mapping=batch.slot_mapping,
        num_decodes=batch.num_decodes,
        max_query_len=max(batch.query_lens),
        max_seq_len=max(batch.seq_lens_list),
        query_lens_cpu=batch.query_lens,
        seq_lens_cpu=batch.seq_lens_list,
    )
    results = []
    for backend, dev in (
        (TorchAttentionBackend(), torch.device("cpu")),
        (TritonAttentionBackend(), device),
    ):
        k_cache, v_cache = batch.k_cache.clone().to(dev), batch.v_cache.clone().to(dev)
        on = AttentionMetadata(
            **{
                name: value.to(dev) if isinstance(value, torch.Tensor) else value
                for name, value in meta.__dict__.items()
            }
        )
        backend.write_kv(new_k.to(dev), new_v.to(dev), k_cache, v_cache, on.slot_mapping)
        out = backend.forward(batch.query.to(dev), k_cache, v_cache, on, 0.125)
        results.append((out.cpu(), k_cache.cpu(), v_cache.cpu()))
    (ref, k_ref, v_ref), (out, k_out, v_out) = results
    torch.testing.assert_close(k_out, k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v_out, v_ref, atol=0, rtol=0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
