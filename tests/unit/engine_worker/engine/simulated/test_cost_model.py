"""The roofline cost model, checked against arithmetic done by hand.

Llama-3.1-8B: a layer has 4096*4096 (q) + 2*4096*1024 (k, v) + 4096*4096 (o) =
41,943,040 attention and 3*4096*14336 = 176,160,768 MLP parameters, 218,103,808 in
all; 32 layers make 6,979,321,856, the LM head adds 128256*4096 = 525,336,576, so a
token multiplies through 7,504,658,432 parameters (8,029,995,008 with the embedding:
the published 8.03B). In bf16 a forward streams 15,009,316,864 bytes of weights, and
each token's KV is 2*32*8*128*2 = 131,072 bytes.
"""

from __future__ import annotations

import pytest

from engine_worker.engine.simulated.cost_model import StepShape, shape_of, step_cost
from engine_worker.engine.simulated.profiles import LLAMA_3_1_8B, PROFILES, get_profile

H100 = PROFILES["h100-llama3-8b"]
H200 = PROFILES["h200-llama3-8b"]


def test_llama_3_1_8b_shapes_match_the_published_sizes() -> None:
    m = LLAMA_3_1_8B
    assert m.layer_params == 218_103_808
    assert m.matmul_params == 7_504_658_432
    assert m.total_params == 8_029_995_008
    assert m.weight_bytes_read == 15_009_316_864
    assert m.kv_bytes_per_token == 131_072


def test_shape_counts_attention_pairs_of_decodes_and_chunks() -> None:
    # A decode at context 10 attends 10 pairs; a 4-token chunk ending at 6 attends
    # 3+4+5+6 = 18 pairs.
    assert shape_of([(1, 10), (4, 6)]) == StepShape(
        num_tokens=5, attended_pairs=28, context_tokens=16
    )


def test_one_decode_is_memory_bound() -> None:
    cost = step_cost(H100, StepShape(num_tokens=1, attended_pairs=1, context_tokens=1))
    # bytes: weights + one token's KV read + one written.
    assert cost.bytes_moved == 15_009_316_864 + 2 * 131_072
    # 15,009,579,008 B / (3.35e12 B/s * 0.6) = 7.46745 ms; + 2 ms overhead.
    assert cost.memory_s == pytest.approx(7.46745e-3, rel=1e-5)
    # 2 * 7,504,658,432 + 4*32*32*128 = 15,009,841,152 FLOPs / (989e12 * 0.4) = 37.94 us.
    assert cost.flops == 15_009_841_152
    assert cost.compute_s == pytest.approx(37.942e-6, rel=1e-4)
    assert cost.seconds == pytest.approx(9.46745e-3, rel=1e-5)


def test_256_decodes_at_context_384() -> None:
    shape = shape_of([(1, 384)] * 256)
    cost = step_cost(H100, shape)
    # KV read 256*384*131072 = 12,884,901,888 B, written 256*131072 = 33,554,432 B.
    assert cost.bytes_moved == 15_009_316_864 + 12_884_901_888 + 33_554_432
    # 27,927,773,184 B / 2.01e12 B/s = 13.894 ms; compute 256*15.009 GFLOP + attention
    # 4*32*32*128*98,304 = 3.8941e12 FLOPs / 3.956e14 = 9.843 ms: memory bound.
    assert cost.memory_s == pytest.approx(13.8944e-3, rel=1e-4)
    assert cost.compute_s == pytest.approx(9.8436e-3, rel=1e-4)
    assert cost.seconds == pytest.approx(15.8944e-3, rel=1e-4)
    # The same batch on an H200 (4.8 TB/s) is memory bound too, 1.433x faster in HBM.
    h200 = step_cost(H200, shape)
    assert h200.memory_s == pytest.approx(cost.memory_s * 3.35 / 4.8, rel=1e-9)


def test_a_long_prefill_chunk_is_compute_bound() -> None:
    shape = shape_of([(2048, 2048)])
    assert shape.attended_pairs == 2048 * 2048 - 2048 * 2047 // 2 == 2_098_176
    cost = step_cost(H100, shape)
    # 2 * 7,504,658,432 * 2048 + 524,288 * 2,098,176 = 3.18394e13 FLOPs / 3.956e14.
    assert cost.flops == 2 * 7_504_658_432 * 2048 + 524_288 * 2_098_176
    assert cost.compute_s == pytest.approx(80.484e-3, rel=1e-4)
    assert cost.compute_s > cost.memory_s
    assert cost.seconds == pytest.approx(cost.compute_s + 2e-3)


def test_kv_cache_sized_from_what_the_weights_leave() -> None:
    # (80e9 * 0.9 - 8,029,995,008 * 2 - 2**30) / (131072 * 16) = 26,162.7 blocks.
    assert H100.num_kv_blocks(16) == 26_162


def test_an_empty_step_costs_nothing_and_unknown_profiles_are_named() -> None:
    assert step_cost(H100, StepShape(0, 0, 0)).seconds == 0.0
    with pytest.raises(ValueError, match="h100-llama3-8b"):
        get_profile("a100-llama3-8b")
