"""The scheduler by example, without a model (in the manner of vLLM's tests/v1/core):
chunked prefill under the token budget, decodes first, admission by priority then
arrival, head-of-line blocking, preemption order, re-prefill after preemption, prefix
hits on admission, n > 1 siblings sharing their leader's prompt blocks, the admission
reserve the worker pulls by.

A "step" is schedule() then commit(); every sequence that samples gets one token, as the
model runner would append it.
"""

from __future__ import annotations

import itertools

import pytest

from engine_worker.engine.block_manager import BlockManager
from engine_worker.engine.scheduler import Scheduler
from engine_worker.engine.sequence import Sequence, SequenceStatus
from shared.sampling_params import SamplingParams


class Engine:
    """A scheduler, its block manager, and sequences numbered in arrival order."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        budget: int,
        max_num_seqs: int = 8,
        caching: bool = True,
    ) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget)
        self.ids = itertools.count()

    def add(
        self,
        prompt: list[int],
        priority: int = 0,
        leader: Sequence | None = None,
        **params,
    ) -> Sequence:
        sid = next(self.ids)
        seq = Sequence(
            sid, f"r{sid}", 0, list(prompt), len(prompt), SamplingParams(**params), priority, sid
        )
        seq.prefill_leader = leader
        self.sched.add(seq)
        return seq

    def step(self, token: int = 3) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """One step: (the scheduled (sequence, tokens) pairs, the preempted sequences)."""
        batch = self.sched.schedule()
        items, preempted = list(batch.items), list(batch.preempted)
        for seq in self.sched.commit(batch):
            seq.token_ids.append(token)
        return items, preempted

    def live(self) -> list[Sequence]:
        return self.sched.running + self.sched.waiting


def prompt(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


# -- chunked prefill and the token budget -------------------------------------------


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=8)
    seq = eng.add(prompt(100, 20))
    chunks, tables = [], []
    for _ in range(3):
        items, _ = eng.step()
        chunks.append(items)
        tables.append(len(seq.block_table))
    assert chunks == [[(seq, 8)], [(seq, 8)], [(seq, 4)]]
    assert tables == [2, 4, 5]  # blocks grow with the chunks, not all at admission
    assert seq.num_output_tokens == 1  # only the last chunk samples
    assert eng.step()[0] == [(seq, 1)]


def test_no_token_is_sampled_before_the_whole_prompt_is_computed() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=5)
    seq = eng.add(prompt(100, 12))
    for computed in (5, 10):
        eng.step()
        assert (seq.num_computed_tokens, seq.num_output_tokens) == (computed, 0)
    eng.step()
    assert (seq.num_computed_tokens, seq.num_output_tokens) == (12, 1)


def test_decodes_go_first_and_a_new_prompt_gets_the_rest_of_the_budget() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=10)
    a = eng.add(prompt(100, 4))
    assert eng.step()[0] == [(a, 4)]
    b = eng.add(prompt(200, 20))
    assert eng.step()[0] == [(a, 1), (b, 9)]
    assert eng.step()[0] == [(a, 1), (b, 9)]
    assert eng.step()[0] == [(a, 1), (b, 2)]
    assert eng.step()[0] == [(a, 1), (b, 1)]


def test_a_budget_smaller_than_the_decodes_defers_the_least_important() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=2)
    low = eng.add([1], priority=1)
    high = eng.add([2], priority=0)
    mid = eng.add([3], priority=0)
    assert eng.step()[0] == [(high, 1), (mid, 1)]  # low waits: admission by priority
    assert eng.step()[0] == [(high, 1), (mid, 1)]  # and nothing is preempted for budget
    assert low.status is SequenceStatus.WAITING and eng.sched.num_preemptions == 0


# -- admission -----------------------------------------------------------------------


def test_waiting_sequences_are_admitted_by_priority_then_arrival() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=64, max_num_seqs=2)
    s0 = eng.add(prompt(0, 3), priority=1)
    s1 = eng.add(prompt(10, 3), priority=0)
    s2 = eng.add(prompt(20, 3), priority=0)
    s3 = eng.add(prompt(30, 3), priority=1)
    assert eng.sched.waiting == [s1, s2, s0, s3]
    assert eng.step()[0] == [(s1, 3), (s2, 3)]  # max_num_seqs=2
    assert eng.sched.running == [s1, s2] and eng.sched.waiting == [s0, s3]
    eng.sched.remove(s2)
    assert eng.step()[0] == [(s1, 1), (s0, 3)]
    assert s2.status is SequenceStatus.FINISHED and not s2.block_table


def test_the_head_of_the_queue_waiting_for_blocks_is_not_overtaken() -> None:
    eng = Engine(num_blocks=4, block_size=4, budget=100)
    a = eng.add(prompt(0, 12))  # 3 blocks
    b = eng.add(prompt(20, 8))  # 2 blocks: only 1 left
    c = eng.add(prompt(40, 2))  # 1 block would fit, but arrived after b
    assert eng.step()[0] == [(a, 12)]
    assert eng.sched.waiting == [b, c] and eng.bm.num_free_blocks == 1
    eng.sched.remove(a)
    assert eng.step()[0] == [(b, 8), (c, 2)]


def test_can_admit_keeps_a_block_per_running_sequence_in_reserve() -> None:
    eng = Engine(num_blocks=6, block_size=4, budget=16, max_num_seqs=3)
    assert eng.sched.can_admit(24)  # empty: 16-token first chunk = 4 blocks <= 6
    eng.add(prompt(0, 3))
    assert not eng.sched.can_admit(1)  # something is already waiting
    eng.step()
    eng.add(prompt(10, 3))
    eng.step()  # the first one's 4th token still fits its block
    assert eng.bm.num_free_blocks == 4 and len(eng.sched.running) == 2
    assert eng.sched.can_admit(8)  # 2 blocks + 2 reserved = 4
    assert not eng.sched.can_admit(9)  # 3 blocks + 2 reserved > 4
    assert not eng.sched.can_admit(100)  # first chunk of 16 tokens: 4 blocks + 2 > 4
    eng.add(prompt(20, 1))
    eng.step()
    assert len(eng.sched.running) == 3
    assert not eng.sched.can_admit(1)  # max_num_seqs reached


# -- preemption ----------------------------------------------------------------------


def test_preemption_evicts_the_lowest_priority_latest_arrival_first() -> None:
    eng = Engine(num_blocks=6, block_size=2, budget=64, caching=False)
    a = eng.add(prompt(0, 4), priority=1)
    b = eng.add(prompt(10, 4), priority=0)
    c = eng.add(prompt(20, 4), priority=0)
    assert eng.step()[0] == [(b, 4), (c, 4), (a, 4)]
    assert eng.bm.num_free_blocks == 0
    # Each now holds 5 tokens and needs a third block; none is free.
    d = eng.add(prompt(30, 1), priority=0)
    items, preempted = eng.step()
    assert preempted == [a] and items == [(b, 1), (c, 1)]
    assert a.status is SequenceStatus.WAITING and a.num_computed_tokens == 0
    assert (a.block_table, a.num_preemptions, eng.sched.num_preemptions) == ([], 1, 1)
    assert eng.sched.waiting == [d, a]  # d is not admitted in a step that preempted
    assert eng.bm.num_free_blocks == 0
    eng.bm.check_invariants(eng.live())


def test_among_equal_priorities_the_latest_arrival_is_preempted() -> None:
    eng = Engine(num_blocks=4, block_size=2, budget=64, caching=False)
    first = eng.add(prompt(0, 4))
    second = eng.add(prompt(10, 4))
    eng.step()
    items, preempted = eng.step()
    assert preempted == [second] and items == [(first, 1)]


def test_a_less_important_sequence_preempts_itself_not_a_more_important_one() -> None:
    eng = Engine(num_blocks=5, block_size=2, budget=4, caching=False)
    low = eng.add(prompt(0, 2), priority=1)
    assert eng.step()[0] == [(low, 2)]
    high = eng.add(prompt(10, 10), priority=0)
    assert eng.step()[0] == [(low, 1), (high, 3)]
    assert eng.step()[0] == [(low, 1), (high, 3)]
    assert eng.bm.num_free_blocks == 0
    # low decodes first (decodes before prefill chunks) and needs a block; the only other
    # candidate is high, which is more important, so low gives up its own blocks.
    items, preempted = eng.step()
    assert preempted == [low] and items == [(high, 4)]
    assert eng.sched.running == [high] and eng.sched.waiting == [low]


def test_a_preempted_sequence_recomputes_prompt_and_generated_tokens() -> None:
    eng = Engine(num_blocks=5, block_size=2, budget=4, caching=False)
    low = eng.add(prompt(0, 2), priority=1)
    eng.step()
    high = eng.add(prompt(10, 10), priority=0)
    eng.step()
    eng.step()
    eng.step()  # low is preempted here with 2 prompt + 3 generated tokens
    assert low.token_ids == [0, 1, 3, 3, 3] and low.num_output_tokens == 3
    eng.sched.remove(high)
    # Re-admitted under the same budget: its 5 tokens in chunks of 4, then it samples.
    assert eng.step()[0] == [(low, 4)]
    assert eng.step()[0] == [(low, 1)]
    assert low.token_ids == [0, 1, 3, 3, 3, 3] and low.num_preemptions == 1
    assert low.num_cached_tokens == 0  # prefix stats count the first admission only
    eng.bm.check_invariants(eng.live())


# -- prefix caching and n > 1 --------------------------------------------------------


def test_a_prefix_hit_skips_the_cached_tokens_on_admission() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=64)
    a = eng.add(prompt(100, 9))
    eng.step()
    eng.sched.remove(a)
    b = eng.add([*prompt(100, 8), 7, 8, 9])
    assert eng.step()[0] == [(b, 3)]
    assert b.block_table[:2] == [0, 1]  # a's freed blocks, revived
    assert (b.num_cached_tokens, b.num_computed_tokens) == (8, 11)
    assert (eng.bm.prefix_queries, eng.bm.prefix_hits) == (9 + 11, 8)


def test_an_identical_prompt_recomputes_only_its_last_block() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=64)
    a = eng.add(prompt(100, 8))
    eng.step()
    b = eng.add(prompt(100, 8))
    items, _ = eng.step()
    assert items == [(a, 1), (b, 4)]
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert eng.bm.blocks[a.block_table[0]].ref_count == 2


def test_n_siblings_wait_for_the_leader_then_share_its_prompt_blocks() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=64)
    leader = eng.add(prompt(100, 10), seed=1)
    siblings = [eng.add(prompt(100, 10), leader=leader, seed=1) for _ in range(2)]
    assert eng.step()[0] == [(leader, 10)]  # the siblings wait, without blocking the queue
    assert eng.sched.waiting == siblings
    items, _ = eng.step()
    assert items == [(leader, 1), (siblings[0], 2), (siblings[1], 2)]
    shared = leader.block_table[:2]
    assert [s.block_table[:2] for s in siblings] == [shared, shared]
    assert [eng.bm.blocks[b].ref_count for b in shared] == [3, 3]
    assert [s.num_cached_tokens for s in siblings] == [8, 8]
    assert eng.bm.num_free_blocks == 16 - 3 - 1 - 1
    assert (eng.bm.prefix_queries, eng.bm.prefix_hits) == (30, 16)
    for seq in (leader, *siblings):
        eng.sched.remove(seq)
    assert eng.bm.num_free_blocks == 16
    eng.bm.check_invariants([])


def test_a_sibling_of_a_finished_leader_is_admitted_at_once() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=64)
    leader = eng.add(prompt(100, 6))
    sibling = eng.add(prompt(100, 6), leader=leader)
    assert not sibling.ready_to_admit()
    eng.sched.remove(leader)  # aborted before its prefill ran
    assert sibling.ready_to_admit()
    assert eng.step()[0] == [(sibling, 6)]


def test_an_embedding_prompt_never_takes_cached_blocks() -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=64)
    eng.add(prompt(100, 9))
    eng.step()
    emb = eng.add(prompt(100, 9), pooling="mean")
    generate = eng.add(prompt(100, 9))
    items, _ = eng.step()
    assert (emb, 9) in items and (generate, 1) in items
    assert emb.num_cached_tokens == 0 and generate.num_cached_tokens == 8


def test_any_schedule_keeps_the_budget_and_the_block_tables_large_enough() -> None:
    """A busy mixed run by example: every step within budget and seq limit, every table
    big enough for what it computes, no block leaked at the end."""
    eng = Engine(num_blocks=12, block_size=4, budget=7, max_num_seqs=3)
    seqs = [eng.add(prompt(10 * i, 3 + 4 * i), priority=i % 2) for i in range(5)]
    for _ in range(40):
        batch = eng.sched.schedule()
        assert batch.num_tokens <= 7 and len(eng.sched.running) <= 3
        for seq, n in batch.items:
            assert len(seq.block_table) * 4 >= seq.num_computed_tokens + n
        for seq in eng.sched.commit(batch):
            seq.token_ids.append(3)
            if seq.num_output_tokens == 4:
                eng.sched.remove(seq)
        eng.bm.check_invariants(eng.live())
    assert all(s.is_finished and s.num_output_tokens == 4 for s in seqs)
    assert eng.bm.num_free_blocks == 12


@pytest.mark.parametrize(("budget", "expected"), [(4, [4, 4, 2]), (5, [5, 5]), (16, [10])])
def test_chunk_sizes_follow_the_budget(budget: int, expected: list[int]) -> None:
    eng = Engine(num_blocks=16, block_size=4, budget=budget)
    seq = eng.add(prompt(0, 10))
    chunks = [eng.step()[0][0][1] for _ in expected]
    assert chunks == expected and seq.num_output_tokens == 1
