"""Property tests: any interleaving of add/step/abort/finish leaks no block and loses no request.

The model is replaced by a stand-in that emits a token per sampling sequence, so hypothesis
can explore thousands of schedules; the real model is covered by the equivalence tests.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.block_manager import BlockManager
from engine_worker.engine.scheduler import Scheduler
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(1, 40),  # prompt length
            st.integers(1, 12),  # max tokens
            st.integers(0, 2),  # priority
            st.integers(0, 3),  # shared-prefix group (exercises prefix caching)
        ),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    max_size=60,
)


class Harness:
    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, budget: int, caching: bool):
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.sched = Scheduler(self.bm, max_seqs, budget)
        self.live: dict[int, Sequence] = {}
        self.finished: set[int] = set()
        self.aborted: set[int] = set()
        self.ids = itertools.count()
        self.max_len = num_blocks * block_size

    def add(self, prompt_len: int, max_tokens: int, priority: int, group: int) -> None:
        sid = next(self.ids)
        prompt = [group * 7 + i % 5 for i in range(prompt_len)]
        max_tokens = min(max_tokens, self.max_len - prompt_len)
        if max_tokens < 1:
            return
        seq = Sequence(
            sid,
            f"r{sid}",
            0,
            prompt,
            prompt_len,
            SamplingParams(max_tokens=max_tokens),
            priority,
            sid,
        )
        self.live[sid] = seq
        self.sched.add(seq)

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

    def abort(self, k: int) -> None:
        if not self.live:
            return
        sid = sorted(self.live)[k % len(self.live)]
        self.sched.remove(self.live.pop(sid))
        self.aborted.add(sid)

    def check(self) -> None:
        self.bm.check_invariants(list(self.live.values()))
        held = sum(len(s.block_table) for s in self.live.values())
        assert self.bm.num_free_blocks >= self.bm.num_blocks - held


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    num_blocks=st.integers(6, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_seqs=st.integers(1, 8),
    budget=st.integers(1, 64),
    caching=st.booleans(),
)
def test_no_leak_no_loss(ops, num_blocks, block_size, max_seqs, budget, caching):
    h = Harness(num_blocks, block_size, max_seqs, budget, caching)
    submitted = 0
    for op in ops:
        if op[0] == "add":
            before = len(h.live)
            h.add(*op[1:])
            submitted += len(h.live) - before
        elif op[0] == "step":
            h.step()
        else:
            h.abort(op[1])
        h.check()
    # Drain: everything admitted must finish, in a bounded number of steps.
    for _ in range(10_000):
        if not h.sched.has_work():
            break
        h.step()
        h.check()
    assert not h.sched.has_work()
    assert len(h.finished) + len(h.aborted) == submitted
    assert h.bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in h.bm.blocks)
