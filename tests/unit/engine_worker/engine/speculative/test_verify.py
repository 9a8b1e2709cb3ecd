"""Verification keeps the proposals the model agrees with and adds the model's own token."""

from __future__ import annotations

import torch

from engine_worker.engine.sampler import sample
from engine_worker.engine.sequence import Sequence
from engine_worker.engine.speculative.counters import SpecCounters
from engine_worker.engine.speculative.verify import accepted_prefix, verify
from shared.sampling_params import SamplingParams


def _seq(params: SamplingParams, spec: list[int], seed: int | None = None) -> Sequence:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    seq = Sequence(0, "r", 0, [1, 2, 3], 3, params, 0, 0, generator=gen)
    seq.spec_token_ids = spec
    return seq


def test_accepted_prefix() -> None:
    assert accepted_prefix([4, 5, 6], [4, 5, 7, 9]) == 2
    assert accepted_prefix([4, 5, 6], [4, 5, 6, 9]) == 3
    assert accepted_prefix([4], [3, 9]) == 0


def test_greedy_keeps_matching_prefix_then_model_token() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, token in enumerate([4, 5, 7, 9]):
        logits[row, token] = 5.0
    params = SamplingParams(temperature=0.0, logprobs=2)
    tokens, lps = verify(logits, _seq(params, [4, 5, 6]), None)
    assert tokens == [4, 5, 7]
    assert [lp.token_id for lp in lps] == tokens and len(lps[0].top) == 2
    tokens, _ = verify(logits, _seq(params, [4, 5, 7]), None)
    assert tokens == [4, 5, 7, 9]  # all accepted: the last row's token is a bonus


def test_seeded_sampling_matches_plain_sampling_token_for_token() -> None:
    """The verifier draws plain sampling's noise: same seed, same tokens, proposals or not."""
    torch.manual_seed(0)
    logits = torch.randn(5, 12)
    params = SamplingParams(temperature=0.7, top_k=6)
    plain = []
    seq = _seq(params, [], seed=11)
    for row in range(5):
        token, _ = sample(logits[row : row + 1], [seq], None)
        plain.append(token[0])
    # Proposals that are right for the first two positions, wrong at the third.
    proposals = [plain[0], plain[1], (plain[2] + 1) % 12, plain[3]]
    tokens, _ = verify(logits, _seq(params, proposals, seed=11), None)
    assert tokens == plain[:3]


def test_counters() -> None:
    c = SpecCounters()
    c.record(4, 2)
    c.record(2, 2)
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (2, 6, 4)
    assert c.accepted_per_pos == [2, 2, 0, 0]
    assert c.acceptance_rate == 4 / 6 and c.mean_acceptance_length == 3.0
