"""Property test: speculation inside continuous batching leaks no block and caches no guess.

The model is replaced by a stand-in: each step, running decodes get random proposals and a
random number of them is "accepted", as the engine's verification would; chunked prefill,
prefix caching, preemption and aborts all interleave. After every operation the block
refcounts match the live tables, and every block hash a sequence holds is the hash of its
own verified tokens (a rejected proposal never reaches the prefix cache).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.block_manager import hash_block
from tests.support.scheduler_harness import SchedulerHarness, scheduler_ops


class Harness(SchedulerHarness):
    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, budget: int, seed: int):
        super().__init__(num_blocks, block_size, max_seqs, budget, caching=True)
        self.rng = random.Random(seed)
        self.proposed = 0
        self.accepted = 0

    def propose(self) -> None:
        """What the engine's _propose does, with random proposals and the same caps."""
        for seq in self.sched.running:
            seq.spec_token_ids = []
            room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_len - seq.num_tokens)
            if seq.num_tokens - seq.num_computed_tokens == 1 and room > 1:
                n = self.rng.randint(0, min(4, room - 1))
                seq.spec_token_ids = [self.rng.randint(0, 9) for _ in range(n)]

    def step(self) -> None:
        self.propose()
        batch = self.sched.schedule()
        assert batch.num_tokens <= self.sched.max_num_batched_tokens
        for seq, n in batch.items:
            assert len(seq.block_table) * self.bm.block_size >= seq.num_computed_tokens + n
            assert not seq.spec_token_ids or n == 1 + len(seq.spec_token_ids)
        for seq in self.sched.commit(batch):
            proposals = seq.spec_token_ids
            accepted = self.rng.randint(0, len(proposals))
            self.proposed += len(proposals)
            self.accepted += accepted
            new = [*proposals[:accepted], self.rng.randint(10, 19)]  # last: the model's token
            kept = 0
            for i, token in enumerate(new):
                seq.token_ids.append(token)
                kept += i < len(new) - 1
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.remove(seq)  # finished mid-way: drops the rest
                    break
            if proposals:
                self.sched.finish_speculation(seq, kept)
            if seq.is_finished:
                self.finished.add(seq.seq_id)
                del self.live[seq.seq_id]
            else:
                assert seq.num_tokens - seq.num_computed_tokens == 1

    def check(self) -> None:
        super().check()
        bs = self.bm.block_size
        for seq in self.live.values():
            if not seq.block_table:
                continue
            # Room for the verified tokens only: rejected proposals gave theirs back.
            assert len(seq.block_table) <= max(
                self.bm.blocks_needed(seq.num_tokens), len(seq.block_hashes)
            )
            parent = None
            for i, h in enumerate(seq.block_hashes):
                parent = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
                assert h == parent, "a block hash covers tokens the sequence does not hold"
                assert (i + 1) * bs <= seq.num_computed_tokens


@settings(max_examples=300, deadline=None)
@given(
    ops=scheduler_ops(max_prompt_len=30, max_new_tokens=14),
    num_blocks=st.integers(6, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_seqs=st.integers(1, 8),
    budget=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_speculation_leaks_no_block_and_caches_no_guess(
    ops, num_blocks, block_size, max_seqs, budget, seed
):
    h = Harness(num_blocks, block_size, max_seqs, budget, seed)
    submitted = h.run(ops)
    assert len(h.finished) + len(h.aborted) == submitted
    assert h.bm.num_free_blocks == num_blocks
    assert h.accepted <= h.proposed
