"""Verification keeps the proposals the model agrees with and adds the model's own token."""

from __future__ import annotations

import pytest
import torch

from engine_worker.engine.sampler import sample, sampling_probs
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


def _draw(q: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(q, 1, generator=gen))


def test_rejection_sampler_emits_the_target_distribution_from_any_draft() -> None:
    """Leviathan et al. with a distribution-proposing draft: proposals d ~ q, the first
    emitted token is distributed as p (not q), and a proposal holds with probability
    sum_x min(p(x), q(x)) = 1 - TV(p, q)."""
    params = SamplingParams(temperature=1.0)
    logits = torch.log(torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05], [0.2] * 5]))
    p = logits[0].softmax(-1)
    q = torch.tensor([0.05, 0.20, 0.45, 0.10, 0.20])
    assert float((p - q).abs().max()) > 0.25  # a verifier emitting d as is would show
    gen = torch.Generator().manual_seed(1)
    trials, counts, held = 2_000, torch.zeros(5), 0
    for _ in range(trials):
        d = _draw(q, gen)
        seq = _seq(params, [d])
        seq.spec_draft_probs = q[None]
        tokens, _ = verify(logits, seq, gen)
        counts[tokens[0]] += 1
        held += len(tokens) == 2
    assert float((counts / trials - p).abs().max()) < 0.045  # ~4 standard deviations
    assert held / trials == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.045)


def test_rejection_sampler_keeps_what_the_target_would_draw_and_adds_a_bonus() -> None:
    """q == p: every proposal holds; the bonus token comes from the last row's p."""
    params = SamplingParams(temperature=0.8, top_k=3)
    torch.manual_seed(3)
    logits = torch.randn(4, 9)
    seq0 = _seq(params, [])
    probs = sampling_probs(logits, [seq0] * 4)
    gen = torch.Generator().manual_seed(5)
    bonus = torch.zeros(9)
    for _ in range(500):
        proposals = [_draw(probs[i], gen) for i in range(3)]
        seq = _seq(params, proposals)
        seq.spec_draft_probs = probs[:3].clone()
        tokens, _ = verify(logits, seq, gen)
        assert tokens[:3] == proposals and len(tokens) == 4
        bonus[tokens[3]] += 1
    assert set(torch.nonzero(bonus).flatten().tolist()) <= set(
        torch.nonzero(probs[3]).flatten().tolist()
    )  # top_k=3 holds for the bonus too
    assert float((bonus / 500 - probs[3]).abs().max()) < 0.1


def test_greedy_ignores_draft_probabilities() -> None:
    logits = torch.full((3, 6), -5.0)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = 5.0
    seq = _seq(SamplingParams(temperature=0.0), [2, 3])
    seq.spec_draft_probs = torch.full((2, 6), 1 / 6)
    assert verify(logits, seq, None)[0] == [2, 4]
