"""Triton paged attention on random ragged batches (decodes and prefills of any length,
GQA groups, head dims, block sizes) against the torch reference: a hypothesis sweep,
seconds in Triton's CPU interpreter, so outside the quick unit loop."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.paged_batch import PagedBatch, assert_close, build_paged_batch, run_both


@st.composite
def ragged_batches(draw: st.DrawFn) -> PagedBatch:
    num_decodes = draw(st.integers(0, 3))
    num_prefills = draw(st.integers(0 if num_decodes else 1, 3))
    query_lens, seq_lens = [], []
    for _ in range(num_decodes):
        query_lens.append(1)
        seq_lens.append(draw(st.integers(1, 90)))
    for _ in range(num_prefills):
        q = draw(st.integers(2, 20))
        query_lens.append(q)
        seq_lens.append(q + draw(st.integers(0, 40)))
    kv_heads = draw(st.sampled_from([1, 2]))
    return build_paged_batch(
        query_lens,
        seq_lens,
        num_q_heads=kv_heads * draw(st.sampled_from([1, 2, 4, 8])),
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([32, 64])),
        block_size=draw(st.sampled_from([4, 8, 16])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ragged_batches())
def test_ragged_batches_property(batch: PagedBatch, device: torch.device) -> None:
    assert_close(*run_both(batch, device), torch.float32)
