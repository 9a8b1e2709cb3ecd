"""The C++ paged attention against a dense float64 reference and the torch backend, on
random ragged batches (decodes, multi-token decodes as speculation makes, prefill chunks
after a cached prefix), GQA groups, head dims, block sizes and permuted block tables."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jetserve_kernels.cpu.ops import paged_attention_cpu, write_kv_cache_cpu
from jetserve_kernels.kv_cache_write import write_kv_cache_ref
from jetserve_kernels.paged_attention import paged_attention_ref
from tests.support.paged_batch import PagedBatch, build_paged_batch

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def dense_reference(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Per sequence: its context copied out of the blocks, causal softmax in float64."""
    out = torch.empty(batch.query.shape, dtype=torch.float64)
    block_size = batch.k_cache.shape[1]
    group = batch.query.shape[1] // batch.k_cache.shape[2]
    start = 0
    for b, (q_len, seq_len) in enumerate(zip(batch.query_lens, batch.seq_lens_list, strict=True)):
        slots = [
            int(batch.block_tables[b, p // block_size]) * block_size + p % block_size
            for p in range(seq_len)
        ]
        k = batch.k_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        v = batch.v_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        q = batch.query[start : start + q_len].double()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        rows = torch.arange(q_len)[:, None] + seq_len - q_len
        scores = scores.masked_fill(torch.arange(seq_len)[None, :] > rows, float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        start += q_len
    return out


def run_cpu(batch: PagedBatch, scale: float, tile_tokens: int = 16) -> torch.Tensor:
    return paged_attention_cpu(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        batch.query_start_loc,
        batch.seq_lens,
        batch.block_tables,
        scale,
        tile_tokens=tile_tokens,
    )


def assert_matches_references(out: torch.Tensor, batch: PagedBatch, scale: float) -> None:
    """fp32 output against the float64 dense attention and the torch backend, to 2e-5."""
    torch.testing.assert_close(out.double(), dense_reference(batch, scale), atol=2e-5, rtol=0)
    ref = paged_attention_ref(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        batch.query_start_loc,
        batch.seq_lens,
        batch.block_tables,
        scale,
        num_decodes=batch.num_decodes,
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@st.composite
def ragged_batches(draw: st.DrawFn) -> PagedBatch:
    query_lens, seq_lens = [], []
    for _ in range(draw(st.integers(0, 4))):  # decodes
        query_lens.append(1)
        seq_lens.append(draw(st.integers(1, 120)))
    for _ in range(draw(st.integers(0 if query_lens else 1, 3))):  # chunks and multi-token
        q = draw(st.integers(1, 40))
        query_lens.append(q)
        seq_lens.append(q + draw(st.integers(0, 60)))
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    return build_paged_batch(
        query_lens,
        seq_lens,
        num_q_heads=kv_heads * draw(st.sampled_from([1, 2, 4, 7])),
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([16, 64, 80, 128])),
        block_size=draw(st.sampled_from([1, 4, 16, 32])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ragged_batches(), tile_tokens=st.sampled_from([1, 3, 16]))
def test_matches_dense_reference(batch: PagedBatch, tile_tokens: int) -> None:
    scale = batch.query.shape[-1] ** -0.5
    out = run_cpu(batch, scale, tile_tokens)
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    assert_matches_references(out, batch, scale)


def test_half_precision_storage() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        batch = build_paged_batch([1, 1, 9, 3], [40, 7, 30, 3], 8, 2, 64, 16, dtype=dtype)
        scale = 0.125
        out = run_cpu(batch, scale)
        assert out.dtype == dtype
        ref = dense_reference(batch, scale)
        torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ragged_batches(), cache_dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_fp32_query_over_a_half_precision_cache(
    batch: PagedBatch, cache_dtype: torch.dtype
) -> None:
    """--kv-cache-dtype under an fp32 model: the cache's rounding is the only one, so the
    kernel equals the float64 attention over the rounded cache to fp32 accuracy (the
    AVX-512 loads widen either; head dim 80 takes the generic loops)."""
    batch.k_cache, batch.v_cache = batch.k_cache.to(cache_dtype), batch.v_cache.to(cache_dtype)
    scale = batch.query.shape[-1] ** -0.5
    out = run_cpu(batch, scale)
    assert out.dtype == torch.float32
    assert_matches_references(out, batch, scale)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_lens=st.lists(st.integers(1, 1300), min_size=1, max_size=3),
    prefill=st.none() | st.tuples(st.integers(2, 20), st.integers(0, 1200)),
    tile_tokens=st.sampled_from([1, 16]),
    group=st.sampled_from([1, 3, 4, 7]),
    head_dim=st.sampled_from([16, 32, 64, 128]),
    block_size=st.sampled_from([1, 16, 48]),
    dtypes=st.sampled_from(
        [
            (torch.float32, torch.float32),
            (torch.float32, torch.bfloat16),
            (torch.float32, torch.float16),
            (torch.bfloat16, torch.bfloat16),
            (torch.float16, torch.float16),
        ]
    ),
    sharpness=st.sampled_from([1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_decodes_over_contexts_of_many_chunks(
    seq_lens: list[int],
    prefill: tuple[int, int] | None,
    tile_tokens: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtypes: tuple[torch.dtype, torch.dtype],
    sharpness: float,
    seed: int,
) -> None:
    """The decode path takes the context a chunk (16 KiB of values: 32-512 positions
    here) at a time, with one softmax per chunk: contexts of several chunks, and sharp
    scores whose maxima move from chunk to chunk, still equal the float64 attention. So
    do a prefill chunk's one-token tiles (each sees less than the whole sequence), groups
    of query rows that split 4 + 2 + 1, and a 16-bit model's decodes (its query and
    output rounded at the ends)."""
    model_dtype, cache_dtype = dtypes
    query_lens = [1] * len(seq_lens)
    if prefill is not None:
        query_lens.append(prefill[0])
        seq_lens = [*seq_lens, prefill[0] + prefill[1]]
    batch = build_paged_batch(query_lens, seq_lens, 2 * group, 2, head_dim, block_size, seed=seed)
    batch.query *= sharpness
    batch.k_cache, batch.v_cache = batch.k_cache.to(cache_dtype), batch.v_cache.to(cache_dtype)
    scale = head_dim**-0.5
    if model_dtype == torch.float32:
        out = run_cpu(batch, scale, tile_tokens)
        if sharpness == 1.0:
            assert_matches_references(out, batch, scale)
        else:  # scores in the hundreds: torch's fp32 reference errs by 2e-5 itself
            ref = dense_reference(batch, scale)
            torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        return
    batch.query = batch.query.to(model_dtype)
    out = run_cpu(batch, scale, tile_tokens)
    assert out.dtype == model_dtype
    # Output rounding only (relative to each value), on top of the fp32 accuracy.
    ref = dense_reference(batch, scale)
    tol = TOLERANCE[model_dtype] * (1 + ref.abs())
    assert ((out.double() - ref).abs() <= tol).all()


def test_refuses_a_cache_wider_than_the_query() -> None:
    batch = build_paged_batch([1], [5], 2, 1, 16, 4, dtype=torch.bfloat16)
    batch.k_cache, batch.v_cache = batch.k_cache.float(), batch.v_cache.float()
    with pytest.raises(RuntimeError, match="takes a BFloat16 cache"):
        run_cpu(batch, 0.25)


def test_strided_query_as_the_model_passes_it() -> None:
    """The model hands over q as a view of the fused qkv output (token stride > heads x dim)."""
    batch = build_paged_batch([1, 5], [20, 9], 4, 2, 32, 8)
    scale = 32**-0.5
    wide = torch.randn(batch.query.shape[0], 4 * 32 + 64)
    wide[:, : 4 * 32] = batch.query.reshape(-1, 4 * 32)
    view = wide[:, : 4 * 32].view(-1, 4, 32)
    assert not view.is_contiguous()
    expected = run_cpu(batch, scale)
    batch.query = view
    torch.testing.assert_close(run_cpu(batch, scale), expected, atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    num_tokens=st.integers(1, 30),
    block_size=st.sampled_from([1, 4, 16]),
    skip=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    cache_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_write_kv_matches_reference(
    num_tokens: int, block_size: int, skip: int, seed: int, cache_dtype: torch.dtype
) -> None:
    """fp32 keys and values into a cache of any dtype: rounded once, as torch rounds."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-num_tokens // block_size) + 2
    shape = (num_blocks, block_size, 2, 16)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[: min(skip, num_tokens)] = -1  # padding rows are not written
    key, value = (
        torch.randn(num_tokens, 2, 16, generator=g),
        torch.randn(num_tokens, 2, 16, generator=g),
    )
    caches = [torch.randn(shape, generator=g).to(cache_dtype) for _ in range(2)]
    mine = [c.clone() for c in caches]
    write_kv_cache_ref(key, value, caches[0], caches[1], slots)
    write_kv_cache_cpu(key, value, mine[0], mine[1], slots)
    torch.testing.assert_close(mine, caches, atol=0, rtol=0)
