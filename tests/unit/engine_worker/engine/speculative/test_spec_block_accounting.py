"""Property test: speculation inside continuous batching leaks no block and caches no guess.

The model is replaced by a stand-in: each step, running decodes get random proposals and a
random number of them is "accepted", as the engine's verification would; chunked prefill,
prefix caching, preemption and aborts all interleave. After every operation the block
refcounts match the live tables, and every block hash a sequence holds is the hash of its
own verified tokens (a rejected proposal never reaches the prefix cache).
"""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.block_manager import BlockManager, hash_block
from engine_worker.engine.scheduler import Scheduler
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(1, 30),  # prompt length
            st.integers(1, 14),  # max tokens
            st.integers(0, 2),  # priority
            st.integers(0, 3),  # shared-prefix group (exercises prefix caching)
        ),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    max_size=60,
)


class Harness:
    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, budget: int, seed: int):
        self.bm = BlockManager(num_blocks, block_size, True)
        self.sched = Scheduler(self.bm, max_seqs, budget)
        self.live: dict[int, Sequence] = {}
        self.finished = 0
        self.aborted = 0
        self.ids = itertools.count()
        self.max_len = num_blocks * block_size
        self.rng = random.Random(seed)
        self.proposed = 0
        self.accepted = 0

    def add(self, prompt_len: int, max_tokens: int, priority: int, group: int) -> bool:
        sid = next(self.ids)
        prompt = [group * 7 + i % 5 for i in range(prompt_len)]
        max_tokens = min(max_tokens, self.max_len - prompt_len)
        if max_tokens < 1:
            return False
        params = SamplingParams(max_tokens=max_tokens)
        seq = Sequence(sid, f"r{sid}", 0, prompt, prompt_len, params, priority, sid)
        self.live[sid] = seq
        self.sched.add(seq)
        return True

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
                self.finished += 1
                del self.live[seq.seq_id]
            else:
                assert seq.num_tokens - seq.num_computed_tokens == 1

    def abort(self, k: int) -> None:
        if not self.live:
            return
        sid = sorted(self.live)[k % len(self.live)]
        self.sched.remove(self.live.pop(sid))
        self.aborted += 1

    def check(self) -> None:
        self.bm.check_invariants(list(self.live.values()))
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
    ops=ops,
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
    submitted = 0
    for op in ops:
        if op[0] == "add":
            submitted += h.add(*op[1:])
        elif op[0] == "step":
            h.step()
        else:
            h.abort(op[1])
        h.check()
    for _ in range(10_000):
        if not h.sched.has_work():
            break
        h.step()
        h.check()
    assert not h.sched.has_work()
    assert h.finished + h.aborted == submitted
    assert h.bm.num_free_blocks == num_blocks
    assert h.accepted <= h.proposed
