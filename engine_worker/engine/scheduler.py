"""Continuous batching: which sequences run this step, and how many tokens each.

Each step has a token budget. Running sequences go first (decodes before prefill
chunks), then waiting ones are admitted in (priority, arrival) order while blocks and
budget last; a prompt longer than the remaining budget is prefilled in chunks. When a
running sequence needs a block and none is free, the lowest-priority, latest-arrived
running sequence is preempted by recompute: its blocks are freed and it goes back to
the waiting queue with its generated tokens, to be prefilled again later.

A decoding sequence may carry speculative tokens (`Sequence.spec_token_ids`): it is then
scheduled for its last token plus those, as far as budget and blocks allow (a sequence
short of blocks drops its proposals rather than preempt another), and after the step the
engine keeps what the model verified and gives the rest back (`finish_speculation`).

Under async scheduling a step is scheduled while the previous one still runs: a sequence
that samples there counts its coming token (`Sequence.num_inflight`) and decodes it next,
its input taken on the device; one whose coming token is its last is left out.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from engine_worker.engine.block_manager import BlockManager
from engine_worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The step's work: (sequence, number of new tokens to compute), decodes first."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival)
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management ---------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is and release its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.bm.free(seq)
        seq.spec_token_ids = []
        seq.status = SequenceStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.spec_token_ids = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def can_admit(self, num_prompt_tokens: int) -> bool:
        """Whether a new prompt of this size would start now: the worker's pull signal."""
        if self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        first_chunk = min(num_prompt_tokens, self.max_num_batched_tokens)
        # Keep one block per running sequence in reserve so admitting does not force preemption.
        reserve = len(self.running)
        return self.bm.blocks_needed(first_chunk) + reserve <= self.bm.num_free_blocks

    # -- the step -----------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch()
        scheduled: set[int] = set()
        # Decodes first, then running prefill chunks; each group in priority order.
        order = sorted(
            self.running,
            key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.sort_key),
        )
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.last_in_flight:  # its final token is being sampled: nothing left to run
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.spec_token_ids:
                num_new += self._fit_speculation(seq, budget - num_new)
            target = seq.num_computed_tokens + num_new
            while not self.bm.can_allocate(seq, target, []):
                victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
                victim = max(victims, key=lambda s: s.sort_key) if victims else seq
                if victim is not seq and victim.sort_key < seq.sort_key:
                    victim = seq  # never evict a more important sequence for a less important one
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.bm.allocate(seq, target)
            batch.items.append((seq, num_new))
            scheduled.add(seq.seq_id)
            budget -= num_new

        if batch.preempted:
            return self._ordered(batch)  # memory is tight: admit nothing new this step

        admitted: list[Sequence] = []
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) + len(admitted) >= self.max_num_seqs:
                break
            if not seq.ready_to_admit():
                continue
            # An embedding pools every prompt position's hidden state: nothing may be skipped.
            cached = [] if seq.params.pooling else self.bm.find_cached_prefix(seq)
            num_cached = len(cached) * self.bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.bm.can_allocate(seq, num_cached + num_new, cached):
                break  # head of line waits for blocks; later arrivals must not overtake it
            self.bm.allocate(seq, num_cached + num_new, cached)
            if seq.num_preemptions == 0 and seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
                self.bm.record_prefix_query(seq.num_prompt_tokens, num_cached)
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            batch.items.append((seq, num_new))
            budget -= num_new
        for seq in admitted:
            self.waiting.remove(seq)
            self.running.append(seq)
        return self._ordered(batch)

    def _fit_speculation(self, seq: Sequence, budget: int) -> int:
        """Trim a decode's proposals to the budget left and the free blocks; their count."""
        spec = seq.spec_token_ids[:budget]
        if spec:
            need = self.bm.blocks_needed(seq.num_tokens + len(spec)) - len(seq.block_table)
            # A block in reserve per running sequence: never preempt anyone for a guess.
            if need + len(self.running) > self.bm.num_free_blocks:
                spec = []
        seq.spec_token_ids = spec
        return len(spec)

    @staticmethod
    def _ordered(batch: ScheduledBatch) -> ScheduledBatch:
        """Decodes (one new token) first, as the attention metadata expects."""
        batch.items.sort(key=lambda item: item[1] != 1)
        return batch

    def commit(self, batch: ScheduledBatch) -> list[Sequence]:
        """Account the step's computed tokens; return the sequences that now sample."""
        samplers = []
        for seq, num_new in batch.items:
            # Proposed tokens' KV is written but not yet theirs: see finish_speculation.
            seq.num_computed_tokens += num_new - len(seq.spec_token_ids)
            self.bm.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                samplers.append(seq)
        return samplers

    def finish_speculation(self, seq: Sequence, num_accepted: int) -> None:
        """After verification: the first `num_accepted` proposals (already appended to the
        sequence's tokens by the engine) keep their KV; the blocks that only rejected
        ones used go back to the free queue. A finished sequence has freed everything."""
        seq.spec_token_ids = []
        if seq.is_finished:
            return
        seq.num_computed_tokens += num_accepted
        self.bm.truncate(seq, seq.num_tokens)
        self.bm.cache_full_blocks(seq)
