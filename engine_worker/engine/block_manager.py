"""Paged KV block allocation with reference counts and prefix caching.

Full blocks are identified by a hash chained over their token ids (and the hash of the
block before), so two sequences with a common prefix share those blocks copy-free.
Blocks whose last reference is dropped keep their hash and sit in an LRU free queue:
a later request with the same prefix revives them; allocation evicts the oldest first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine_worker.engine.sequence import Sequence
from shared.kv_blocks import hash_block

__all__ = ["Block", "BlockManager", "hash_block"]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockManager:
    """Owns every KV block; the scheduler asks it for room and hands back finished sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 blocks, least recently freed first: the eviction order.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0
        # Hashes cached (True) or evicted (False) since the last drain, the last change of
        # each hash winning: what a worker announces so API replicas can route by prefix.
        # None (the default, e.g. offline use) records nothing.
        self.kv_changes: dict[bytes, bool] | None = None

    def record_kv_changes(self) -> None:
        """Start recording cache changes for `drain_kv_changes` (the worker does)."""
        if self.kv_changes is None:
            self.kv_changes = {h: True for h in self.cached}

    def drain_kv_changes(self) -> tuple[list[bytes], list[bytes]]:
        """(stored, evicted) hashes since the last call; applying them in any order to the
        set reported before gives the set cached now."""
        if not self.kv_changes:
            return [], []
        changes, self.kv_changes = self.kv_changes, {}
        stored = [h for h, present in changes.items() if present]
        evicted = [h for h, present in changes.items() if not present]
        return stored, evicted

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering a prefix of the sequence, at least one token left to compute.

        The last token must be recomputed to get logits, so a fully cached prompt
        still leaves its last block to the sequence itself.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        found: list[int] = []
        parent: bytes | None = None
        for i in range(max_blocks):
            if i < len(seq.block_hashes):
                h = seq.block_hashes[i]
            else:
                h = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block_id = self.cached.get(h)
            if block_id is None:
                break
            found.append(block_id)
            parent = h
        return found

    def can_allocate(self, seq: Sequence, num_tokens: int, cached_blocks: list[int]) -> bool:
        """Room for the sequence to hold `num_tokens` tokens, reusing `cached_blocks`."""
        reusable_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        new = self.blocks_needed(num_tokens) - len(seq.block_table) - len(cached_blocks)
        return max(new, 0) <= self.num_free_blocks - reusable_free

    def allocate(self, seq: Sequence, num_tokens: int, cached_blocks: list[int] = ()) -> None:
        """Grow the block table to hold `num_tokens`; take cached blocks first (admission only)."""
        if cached_blocks:
            assert not seq.block_table, "cached prefixes are taken on admission only"
            for block_id in cached_blocks:
                self._take(block_id)
                seq.block_table.append(block_id)
                seq.block_hashes.append(self.blocks[block_id].block_hash)  # type: ignore[arg-type]
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError("allocate() called without room; ask can_allocate() first")
        for _ in range(need):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict: its content is about to be overwritten
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                    if self.kv_changes is not None:
                        self.kv_changes[block.block_hash] = False
                block.block_hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_query_tokens
        self.prefix_hits += num_hit_tokens

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks are queued for eviction first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Release the table's blocks past those `num_tokens` tokens need: a speculative
        step allocated room for every proposed token, and the rejected ones give it back.

        Only blocks past the computed frontier go, never full (hashed, maybe shared) ones;
        they head the free queue so that allocation reuses them before evicting cached ones.
        """
        keep = self.blocks_needed(num_tokens)
        assert keep >= len(seq.block_hashes), "truncate() below the computed full blocks"
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"double free of block {block_id}")
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                self.free_queue.move_to_end(block_id, last=False)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full with computed KV so others can share them."""
        bs = self.block_size
        # Under async scheduling the newest computed token may still be on the device:
        # a block is hashed once all its token ids are known on the host.
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            if not self.enable_prefix_caching:
                continue
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached:  # another sequence may have computed the same block first
                self.cached[h] = block.block_id
                block.block_hash = h
                if self.kv_changes is not None:
                    self.kv_changes[h] = True

    def check_invariants(self, live: list[Sequence]) -> None:
        """Refcounts equal the number of live tables holding each block; used by tests."""
        expected = [0] * self.num_blocks
        for seq in live:
            for b in seq.block_table:
                expected[b] += 1
        for block in self.blocks:
            assert block.ref_count == expected[block.block_id], (block, expected[block.block_id])
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), block
        for h, b in self.cached.items():
            assert self.blocks[b].block_hash == h
