"""The block manager's record of cache changes (what a worker announces for prefix
routing): draining it after any run of admissions, frees and evictions and applying the
changes to the set announced before gives exactly the set of cached hashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.block_manager import BlockManager
from engine_worker.engine.sequence import Sequence
from shared.kv_blocks import full_block_hashes, hash_block, reusable_blocks
from shared.sampling_params import SamplingParams

pytestmark = pytest.mark.unit


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), len(tokens), SamplingParams(), 0, seq_id)


prompts = st.lists(st.integers(0, 3), min_size=1, max_size=14)  # few tokens: many shared prefixes


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["run", "free"]), prompts), max_size=25),
    drain_every=st.integers(1, 4),
)
def test_drained_changes_rebuild_the_cached_set(ops, drain_every) -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    bm.record_kv_changes()
    announced: set[bytes] = set()
    live: list[Sequence] = []
    for i, (op, tokens) in enumerate(ops):
        if op == "free" and live:
            bm.free(live.pop(0))
        elif op == "run":
            seq = make_seq(i, tokens)
            cached = bm.find_cached_prefix(seq)
            if bm.can_allocate(seq, seq.num_tokens, cached):
                bm.allocate(seq, seq.num_tokens, cached)
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_full_blocks(seq)
                live.append(seq)
        if i % drain_every == 0:
            stored, evicted = bm.drain_kv_changes()
            announced = (announced - set(evicted)) | set(stored)
            assert announced == set(bm.cached)
    stored, evicted = bm.drain_kv_changes()
    assert (announced - set(evicted)) | set(stored) == set(bm.cached)


def test_recording_is_off_unless_asked_and_starts_from_the_current_cache() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq(0, [5, 6, 7, 8, 9])
    bm.allocate(seq, 5)
    seq.num_computed_tokens = 5
    bm.cache_full_blocks(seq)
    assert bm.drain_kv_changes() == ([], [])  # offline use records nothing
    bm.record_kv_changes()
    stored, evicted = bm.drain_kv_changes()
    assert set(stored) == set(bm.cached) and not evicted


def test_the_api_side_hashes_equal_the_engines() -> None:
    """Routing predicts hits with shared.kv_blocks; the engine caches with the same chain."""
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(40, 51))  # 11 tokens: two full blocks
    seq = make_seq(0, tokens)
    bm.allocate(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    bm.cache_full_blocks(seq)
    assert full_block_hashes(tokens, 4) == seq.block_hashes == list(bm.cached)
    assert full_block_hashes(tokens, 4)[1] == hash_block(hash_block(None, tokens[:4]), tokens[4:8])
    # What find_cached_prefix would take: never the block holding the last token.
    assert reusable_blocks(12, 4) == 2 and reusable_blocks(13, 4) == 3
    again = make_seq(1, [*tokens[:8], 1, 2])
    assert len(bm.find_cached_prefix(again)) == reusable_blocks(again.num_tokens, 4) == 2
