"""The scheduler and block manager driven without a model, for hypothesis: random
add/step/abort operations, a subclass's stand-in for what the model emits each step, and
the block invariants checked after every operation."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from engine_worker.engine.block_manager import BlockManager
from engine_worker.engine.scheduler import Scheduler
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams


def scheduler_ops(max_prompt_len: int, max_new_tokens: int) -> st.SearchStrategy:
    """Up to 60 operations: add a request, step the engine, abort a live request."""
    return st.lists(
        st.one_of(
            st.tuples(
                st.just("add"),
                st.integers(1, max_prompt_len),  # prompt length
                st.integers(1, max_new_tokens),  # max tokens
                st.integers(0, 2),  # priority
                st.integers(0, 3),  # shared-prefix group (exercises prefix caching)
            ),
            st.tuples(st.just("step")),
            st.tuples(st.just("abort"), st.integers(0, 50)),
        ),
        max_size=60,
    )


class SchedulerHarness:
    """Live requests by id, and which finished or were aborted; `step` is the subclass's."""

    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, budget: int, caching: bool):
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.sched = Scheduler(self.bm, max_seqs, budget)
        self.live: dict[int, Sequence] = {}
        self.finished: set[int] = set()
        self.aborted: set[int] = set()
        self.ids = itertools.count()
        self.max_len = num_blocks * block_size

    def add(self, prompt_len: int, max_tokens: int, priority: int, group: int) -> bool:
        """Submit a request; False where the cache cannot hold even one output token."""
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

    def step(self) -> None:
        raise NotImplementedError

    def abort(self, k: int) -> None:
        if not self.live:
            return
        sid = sorted(self.live)[k % len(self.live)]
        self.sched.remove(self.live.pop(sid))
        self.aborted.add(sid)

    def check(self) -> None:
        self.bm.check_invariants(list(self.live.values()))

    def run(self, ops: list[tuple]) -> int:
        """Apply `ops`, checking after each, then step until nothing is left (everything
        admitted must finish, in a bounded number of steps); the requests admitted."""
        submitted = 0
        for op in ops:
            if op[0] == "add":
                submitted += self.add(*op[1:])
            elif op[0] == "step":
                self.step()
            else:
                self.abort(op[1])
            self.check()
        for _ in range(10_000):
            if not self.sched.has_work():
                break
            self.step()
            self.check()
        assert not self.sched.has_work()
        return submitted
