"""Prompt lookup proposes what followed the latest earlier match of the longest suffix."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.sequence import Sequence
from engine_worker.engine.speculative.ngram import NgramProposer, TokenArray, ngram_lookup
from shared.sampling_params import SamplingParams


def sequence(tokens: list[int]) -> Sequence:
    return Sequence(0, "r", 0, list(tokens), len(tokens), SamplingParams(), 0, 0)


def test_longest_suffix_wins_and_latest_match() -> None:
    tokens = [1, 2, 3, 9, 9, 2, 3, 7, 7, 1, 2, 3]
    # "1 2 3" occurs at 0: what followed it is proposed (before the shorter "2 3" at 5).
    assert ngram_lookup(tokens, n_max=3, n_min=1, k=4) == [9, 9, 2, 3]
    # Only bigrams allowed: the latest earlier "2 3" is at 5, followed by 7 7 1 2.
    assert ngram_lookup(tokens, n_max=2, n_min=2, k=4) == [7, 7, 1, 2]


def test_no_match_nothing_proposed() -> None:
    assert ngram_lookup([1, 2, 3, 4], n_max=3, n_min=1, k=4) == []
    assert ngram_lookup([5], n_max=3, n_min=1, k=4) == []
    assert ngram_lookup([5, 5, 5], n_max=3, n_min=1, k=0) == []


def test_proposal_runs_short_at_the_end() -> None:
    assert ngram_lookup([4, 5, 6, 4, 5], n_max=2, n_min=2, k=5) == [6, 4, 5]


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    n_max=st.integers(1, 4),
    k=st.integers(1, 6),
)
def test_proposal_is_what_followed_a_real_occurrence(tokens, n_max, k) -> None:
    got = ngram_lookup(tokens, n_max=n_max, n_min=1, k=k)
    assert len(got) <= k
    if not got:
        assert tokens[-1] not in tokens[:-1]  # even a 1-gram would have matched
        return
    # Some n-gram suffix occurs earlier and `got` is what followed it.
    ok = any(
        tokens[i : i + n] == tokens[-n:] and tokens[i + n : i + n + len(got)] == got
        for n in range(1, min(n_max, len(tokens) - 1) + 1)
        for i in range(len(tokens) - n)
    )
    assert ok


def test_proposer_respects_limits() -> None:
    p = NgramProposer(n_max=2, n_min=1)
    seqs = [sequence([1, 2, 1, 2, 1]), sequence([3, 3, 3])]
    assert p.propose(seqs, [1, 0]) == [[2], []]


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 5), min_size=1, max_size=700),
    steps=st.lists(st.integers(1, 9), min_size=1, max_size=80),
)
def test_a_kept_token_array_proposes_what_the_list_does(tokens, steps) -> None:
    """A sequence growing a few tokens a step (past the array's first capacity): the
    array the proposer keeps on it stays its tokens, and the proposals are the list's."""
    p, seq, grown = NgramProposer(n_max=3, n_min=1), sequence(tokens[:1]), 1
    for n in steps:
        grown = min(len(tokens), grown + n)
        seq.token_ids.extend(tokens[len(seq.token_ids) : grown])
        assert p.propose([seq], [4]) == [ngram_lookup(tokens[:grown], 3, 1, 4)]
        array = seq.proposer_state
        assert array.data[: array.size].tolist() == tokens[:grown]


def test_a_token_array_starts_again_on_a_history_that_is_not_its_extension() -> None:
    array = TokenArray()
    array.sync([1, 2, 3, 4])
    assert array.sync([7, 8]).tolist() == [7, 8]
