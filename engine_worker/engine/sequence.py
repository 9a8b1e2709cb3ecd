"""The state of one completion as it moves through the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from engine_worker.engine.outputs import TokenLogprob
from engine_worker.engine.structured.constraint import SequenceConstraint
from shared.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion: prompt + generated tokens, how many have KV cached, and its blocks.

    `num_computed_tokens` counts tokens whose KV is in the cache; a step computes the
    next chunk and samples only once every known token is computed.
    """

    seq_id: int
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    priority: int
    arrival: int  # engine-wide admission order; ties in priority go first-come first-served
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    num_cached_tokens: int = 0  # prefix-cache hits on first admission
    finish_reason: str | None = None
    stop_token_id: int | None = None
    num_emitted: int = 0  # output tokens already handed out by the engine
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # n > 1: siblings wait until the first completion has prefilled the shared prompt,
    # then take its full blocks from the prefix cache instead of recomputing them.
    prefill_leader: Sequence | None = None
    num_preemptions: int = 0
    constraint: SequenceConstraint | None = None  # grammar state of a structured output
    # Speculative decoding: tokens proposed to follow `token_ids`, not yet verified. The
    # step that schedules them computes their KV after the last real token's and checks
    # them; they never reach `token_ids` (nor a delta) unless the model agrees.
    spec_token_ids: list[int] = field(default_factory=list)
    # [proposals, vocab]: the distribution each proposal was drawn from (a draft model
    # sampling for an unseeded request), for rejection sampling; None: point masses.
    spec_draft_probs: torch.Tensor | None = None
    # What the proposer keeps per sequence (prompt lookup: its tokens as an array),
    # derived from `token_ids` alone, so it goes with the sequence and nothing restores it.
    proposer_state: Any = None
    # Embedding sequences (params.pooling): fp32 sum of the hidden states computed so far
    # (reset when a preemption restarts the prefill), then the pooled vector.
    pooled_sum: torch.Tensor | None = None
    embedding: list[float] | None = None
    # Async scheduling: tokens sampled by launched steps that the host has not read yet.
    # They count in `num_tokens` (the next step computes their KV, its inputs taken on
    # the device) but are not in `token_ids` until their step lands.
    num_inflight: int = 0
    # The token in flight is this sequence's last (its length limit): schedule it no more.
    last_in_flight: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_inflight

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival)

    def ready_to_admit(self) -> bool:
        leader = self.prefill_leader
        return (
            leader is None
            or leader.is_finished
            or leader.num_computed_tokens >= leader.num_prompt_tokens
        )
