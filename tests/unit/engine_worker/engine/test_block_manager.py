"""The block manager by example, without a model: allocation order, chained block hashes,
prefix-cache hits, reference counts of shared blocks, freeing and eviction order.

Each test builds the cache state by hand (a sequence "computes" tokens by setting
num_computed_tokens) and checks exact block ids, counts and queue orders.
"""

from __future__ import annotations

import pytest

from engine_worker.engine.block_manager import BlockManager, hash_block
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), len(tokens), SamplingParams(), 0, seq_id)


def compute(bm: BlockManager, seq: Sequence, cached: list[int] = ()) -> None:
    """Allocate the whole sequence and mark its KV computed, as a finished prefill would."""
    bm.allocate(seq, seq.num_tokens, list(cached))
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


PROMPT = list(range(100, 108))  # two full blocks of 4


def test_allocation_takes_free_blocks_in_id_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(10)))
    bm.allocate(seq, 10)
    assert seq.block_table == [0, 1, 2]
    assert [bm.blocks[b].ref_count for b in range(4)] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    bm.allocate(seq, 13)  # growing by a token that crosses a block boundary takes one more
    assert seq.block_table == [0, 1, 2, 3]
    bm.allocate(seq, 16)  # still inside block 3
    assert seq.block_table == [0, 1, 2, 3]


def test_free_queues_a_sequences_tail_blocks_first() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(10)))
    bm.allocate(seq, 10)
    bm.free(seq)
    # Never-used blocks first, then the freed table tail to head: the head (the most
    # shareable prefix) is evicted last.
    assert list(bm.free_queue) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert seq.block_table == [] and seq.block_hashes == []
    seq.block_table = [2]  # a stale table: block 2 is already free
    with pytest.raises(RuntimeError, match="double free of block 2"):
        bm.free(seq)


def test_full_blocks_get_hashes_chained_over_their_parent() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(10)))
    compute(bm, seq)
    h0 = hash_block(None, [0, 1, 2, 3])
    h1 = hash_block(h0, [4, 5, 6, 7])
    assert seq.block_hashes == [h0, h1]  # block 2 holds 2 tokens: not full, not hashed
    assert bm.cached == {h0: 0, h1: 1}
    assert [bm.blocks[b].block_hash for b in (0, 1, 2)] == [h0, h1, None]
    # The same four tokens after a different first block are a different block.
    assert hash_block(None, [4, 5, 6, 7]) != h1
    assert hash_block(hash_block(None, [0, 1, 2, 9]), [4, 5, 6, 7]) != h1


def test_only_blocks_whose_kv_is_computed_are_cached() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(12)))
    bm.allocate(seq, 12)
    seq.num_computed_tokens = 6  # a prefill chunk of 6 tokens
    bm.cache_full_blocks(seq)
    assert len(seq.block_hashes) == 1 and list(bm.cached.values()) == [0]
    seq.num_computed_tokens = 12
    bm.cache_full_blocks(seq)
    assert list(bm.cached.values()) == [0, 1, 2]


def test_a_fully_cached_prompt_still_computes_its_last_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, make_seq(0, PROMPT))
    # Same 8 tokens: only the first block is offered, the last token needs its logits.
    assert bm.find_cached_prefix(make_seq(1, PROMPT)) == [0]
    # One more token: both full blocks are a hit.
    assert bm.find_cached_prefix(make_seq(2, [*PROMPT, 5])) == [0, 1]
    # A different first token breaks the chain at block 0.
    assert bm.find_cached_prefix(make_seq(3, [99, *PROMPT[1:], 5])) == []
    # Same first block, different second: a hit on block 0 only.
    assert bm.find_cached_prefix(make_seq(4, [*PROMPT[:4], 1, 2, 3, 4, 5])) == [0]


def test_a_freed_prefix_is_revived_from_the_free_queue() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(0, PROMPT)
    compute(bm, a)
    bm.free(a)
    assert list(bm.free_queue) == [2, 3, 4, 5, 6, 7, 1, 0]
    assert sorted(bm.cached.values()) == [0, 1]  # freed, but still findable
    b = make_seq(1, [*PROMPT, 42])
    cached = bm.find_cached_prefix(b)
    assert cached == [0, 1]
    assert bm.can_allocate(b, b.num_tokens, cached)
    bm.allocate(b, b.num_tokens, cached)
    assert b.block_table == [0, 1, 2]  # the revived blocks, then the oldest free one
    assert b.block_hashes == [bm.blocks[0].block_hash, bm.blocks[1].block_hash]
    assert list(bm.free_queue) == [3, 4, 5, 6, 7]
    bm.check_invariants([b])


def test_sequences_sharing_prompt_blocks_count_references() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(0, [*PROMPT, 1])
    compute(bm, a)
    b = make_seq(1, [*PROMPT, 2])
    c = make_seq(2, [*PROMPT, 3])
    for seq in (b, c):
        bm.allocate(seq, seq.num_tokens, bm.find_cached_prefix(seq))
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1, 2], [0, 1, 3], [0, 1, 4])
    assert [bm.blocks[i].ref_count for i in range(5)] == [3, 3, 1, 1, 1]
    assert bm.num_free_blocks == 3
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in range(5)] == [2, 2, 0, 1, 1]
    assert list(bm.free_queue) == [5, 6, 7, 2]  # shared blocks stay out of the queue
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 8
    # The last holder frees the shared prefix, tail first: 1 before 0.
    assert list(bm.free_queue) == [5, 6, 7, 2, 3, 4, 1, 0]
    bm.check_invariants([])


def test_can_allocate_counts_free_cached_blocks_as_taken() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(0, PROMPT)
    compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 3
    nine = make_seq(1, [*PROMPT, 1])  # 3 blocks: 2 revived + 1 new
    assert bm.can_allocate(nine, 9, bm.find_cached_prefix(nine))
    thirteen = make_seq(2, [*PROMPT, 1, 2, 3, 4, 5])  # 4 blocks: 2 revived + 2 new > 1 left
    assert not bm.can_allocate(thirteen, 13, bm.find_cached_prefix(thirteen))
    with pytest.raises(RuntimeError, match="without room"):
        bm.allocate(make_seq(3, list(range(13))), 13)


def test_eviction_takes_the_oldest_free_block_and_drops_its_hash() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(0, PROMPT)
    compute(bm, a)
    h0, h1 = a.block_hashes
    bm.free(a)
    assert list(bm.free_queue) == [2, 3, 1, 0]
    d = make_seq(1, [7, 7, 7, 7])
    bm.allocate(d, 4)
    assert d.block_table == [2]  # never-used blocks go before cached ones
    e = make_seq(2, list(range(50, 58)))
    bm.allocate(e, 8)
    assert e.block_table == [3, 1]  # block 1 (A's tail) is evicted, block 0 survives
    assert bm.blocks[1].block_hash is None and bm.cached == {h0: 0}
    assert bm.find_cached_prefix(make_seq(3, [*PROMPT, 1])) == [0]
    assert h1 not in bm.cached


def test_the_first_copy_of_a_block_stays_the_cached_one() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(0, PROMPT), make_seq(1, PROMPT)
    bm.allocate(a, 8)
    bm.allocate(b, 8)  # admitted in the same step: both compute the same blocks
    for seq in (a, b):
        seq.num_computed_tokens = 8
        bm.cache_full_blocks(seq)
    assert a.block_hashes == b.block_hashes
    assert bm.cached == dict(zip(a.block_hashes, [0, 1], strict=True))
    assert [bm.blocks[i].block_hash for i in (2, 3)] == [None, None]
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])
    # B's duplicate blocks are evicted without touching A's entries.
    c = make_seq(2, list(range(60, 68)))
    bm.allocate(c, 8)
    assert c.block_table == [4, 5]
    assert bm.find_cached_prefix(make_seq(3, [*PROMPT, 1])) == [0, 1]


def test_without_prefix_caching_nothing_is_shared() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(0, PROMPT)
    compute(bm, a)
    assert len(a.block_hashes) == 2  # the sequence still knows its hashes
    assert bm.cached == {} and bm.blocks[0].block_hash is None
    assert bm.find_cached_prefix(make_seq(1, [*PROMPT, 1])) == []


def test_prefix_hit_rate_is_tokens_hit_over_tokens_queried() -> None:
    bm = BlockManager(num_blocks=1, block_size=4)
    assert bm.prefix_hit_rate == 0.0
    bm.record_prefix_query(10, 8)
    bm.record_prefix_query(10, 0)
    assert bm.prefix_hit_rate == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(num_blocks=0, block_size=4)
