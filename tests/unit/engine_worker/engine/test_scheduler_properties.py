"""Property tests: any interleaving of add/step/abort/finish leaks no block and loses no request.

The model is replaced by a stand-in that emits a token per sampling sequence, so hypothesis
can explore thousands of schedules; the real model is covered by the equivalence tests.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.scheduler_harness import SchedulerHarness, scheduler_ops


class Harness(SchedulerHarness):
    def step(self) -> None:
        batch = self.sched.schedule()
        assert batch.num_tokens <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        for seq, n in batch.items:
            assert len(seq.block_table) * self.bm.block_size >= seq.num_computed_tokens + n
        for seq in self.sched.commit(batch):
            seq.token_ids.append(3)
            if seq.num_output_tokens >= seq.params.max_tokens:
                self.sched.remove(seq)
                self.finished.add(seq.seq_id)
                del self.live[seq.seq_id]

    def check(self) -> None:
        super().check()
        held = sum(len(s.block_table) for s in self.live.values())
        assert self.bm.num_free_blocks >= self.bm.num_blocks - held


@settings(max_examples=300, deadline=None)
@given(
    ops=scheduler_ops(max_prompt_len=40, max_new_tokens=12),
    num_blocks=st.integers(6, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_seqs=st.integers(1, 8),
    budget=st.integers(1, 64),
    caching=st.booleans(),
)
def test_no_leak_no_loss(ops, num_blocks, block_size, max_seqs, budget, caching):
    h = Harness(num_blocks, block_size, max_seqs, budget, caching)
    submitted = h.run(ops)
    assert len(h.finished) + len(h.aborted) == submitted
    assert h.bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in h.bm.blocks)
