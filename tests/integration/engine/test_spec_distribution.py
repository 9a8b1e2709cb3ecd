"""Sampled outputs with speculation are distributed exactly as plain sampling's.

A chi-square goodness-of-fit test over 1,000 unseeded completions of 4 tokens (top_k=3,
so 81 possible completions) against the probabilities the model itself gives each
completion, for both kinds of proposal, two per step:
- point masses: a greedy "draft" (the model's own argmax continuation, so they are often
  but not always accepted), verified by the exact-noise rule;
- distributions: a real draft model (the target with its weights perturbed, so its q is
  near p but not equal) sampling its proposals from q, verified by Leviathan et al.'s
  rejection sampler against the q it kept.
The engine's seed is fixed, so the test is deterministic. The same samples must fail the
test against the distribution that blindly accepting proposals would give: the test has
the power to see a wrong verifier.
"""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine_worker.engine.llm import LLM
from engine_worker.engine.sampler import sampling_probs
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams

PROMPT = [0, 17, 29, 31, 44, 52]
PARAMS = SamplingParams(max_tokens=4, temperature=1.0, top_k=3, ignore_eos=True, n=100)
REQUESTS = 10  # x n=100: 1,000 completions


class GreedyDraft:
    """Proposes the model's own argmax continuation of each history."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache: dict[tuple[int, ...], int] = {}

    def next_greedy(self, history: tuple[int, ...]) -> int:
        if history not in self.cache:
            with torch.inference_mode():
                logits = self.model.forward_causal(torch.tensor([history]))[0, -1]
            self.cache[history] = int(logits.argmax())
        return self.cache[history]

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        out = []
        for seq, limit in zip(seqs, limits, strict=True):
            h, guess = tuple(seq.token_ids), []
            for _ in range(limit):
                guess.append(self.next_greedy(h))
                h = (*h, guess[-1])
            out.append(guess)
        return out


def _dist(model, prefix: tuple[int, ...]) -> dict[int, float]:
    """`model`'s sampling distribution (PARAMS: top_k=3) after the prompt and `prefix`."""
    seq = Sequence(0, "p", 0, list(PROMPT), len(PROMPT), PARAMS, 0, 0)
    with torch.inference_mode():
        logits = model.forward_causal(torch.tensor([[*PROMPT, *prefix]]))[0, -1:]
    probs = sampling_probs(logits.float(), [seq])[0]
    return {t: float(probs[t]) for t in torch.nonzero(probs).flatten().tolist()}


def completion_probs(model, draft=None) -> dict[tuple[int, ...], float]:
    """P(completion) under top-k sampling; with `draft`, under a verifier that wrongly
    accepts every proposal: tokens 2 and 3 are the draft's (a GreedyDraft's argmax, or
    drawn from a draft model's own distribution)."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for pos in range(PARAMS.max_tokens):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, p in out.items():
            if isinstance(draft, GreedyDraft) and pos in (1, 2):
                forced = draft.next_greedy((*PROMPT, *prefix))
                grown[(*prefix, forced)] = p
                continue
            source = draft if draft is not None and pos in (1, 2) else model
            for t, q in _dist(source, prefix).items():
                grown[(*prefix, t)] = p * q
        out = grown
    return out


def chi_square_p(counts: Counter, probs: dict[tuple[int, ...], float], n: int) -> float:
    """Cells with an expected count under 5 are pooled into one."""
    observed, expected, pool_o, pool_e = [], [], 0.0, 0.0
    for cell in set(probs) | set(counts):
        e, o = probs.get(cell, 0.0) * n, counts.get(cell, 0)
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
        else:
            observed.append(o)
            expected.append(e)
    if pool_e > 0 or pool_o > 0:
        observed.append(pool_o)
        expected.append(max(pool_e, 1e-9))
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def sample_completions(llm: LLM) -> Counter:
    results = llm.generate([PROMPT] * REQUESTS, PARAMS)
    return Counter(tuple(c.token_ids) for r in results for c in r.outputs)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    kw = dict(block_size=4, num_kv_blocks=1024, max_num_seqs=128, seed=1234)
    plain = LLM(str(tiny_llama), **kw)
    spec = LLM(str(tiny_llama), speculative_method="ngram", num_speculative_tokens=2, **kw)
    spec.engine.proposer = GreedyDraft(spec.engine.runner.model)
    return plain, spec


def test_speculative_sampling_matches_the_model_distribution(engines) -> None:
    plain, spec = engines
    model = spec.engine.runner.model
    probs = completion_probs(model)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    n = REQUESTS * PARAMS.n
    spec_counts = sample_completions(spec)
    stats = spec.engine.stats().spec
    # Proposals were made for every completion, and some but not all were accepted.
    assert stats.num_drafts >= n and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert chi_square_p(spec_counts, probs, n) > 1e-3
    assert chi_square_p(sample_completions(plain), probs, n) > 1e-3  # the control
    # The test can tell: against blind acceptance of proposals the same samples fail.
    blind = completion_probs(model, spec.engine.proposer)
    assert chi_square_p(spec_counts, blind, n) < 1e-6


def perturbed_copy(src: Path, dest: Path, scale: float, seed: int) -> Path:
    """`src`'s checkpoint with Gaussian noise (`scale` x each tensor's std) on every
    weight but the norms: a draft whose distribution is near the target's, not equal."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    gen = torch.Generator().manual_seed(seed)
    for path in dest.glob("*.safetensors"):
        tensors = load_file(path)
        for name, t in tensors.items():
            if "norm" not in name:
                tensors[name] = t + scale * t.std() * torch.randn(t.shape, generator=gen)
        save_file(tensors, path, metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def draft_engine(tiny_llama, tmp_path_factory):
    draft = perturbed_copy(tiny_llama, tmp_path_factory.mktemp("near") / "draft", 0.03, 7)
    kw = dict(block_size=4, num_kv_blocks=1024, max_num_seqs=128, seed=1234)
    return LLM(
        str(tiny_llama),
        speculative_method="draft",
        speculative_model=str(draft),
        num_speculative_tokens=2,
        **kw,
    )


def test_draft_sampling_q_matches_the_model_distribution(draft_engine) -> None:
    """The draft proposes from its own q (not a point mass) and the rejection sampler
    corrects toward p: the completions have the target's distribution."""
    model = draft_engine.engine.runner.model
    draft_model = draft_engine.engine.proposer.runner.model
    probs = completion_probs(model)
    n = REQUESTS * PARAMS.n
    counts = sample_completions(draft_engine)
    stats = draft_engine.engine.stats().spec
    assert stats.num_drafts >= n and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert chi_square_p(counts, probs, n) > 1e-3
    # Against keeping every proposal (tokens 2 and 3 from q) the same samples fail.
    blind = completion_probs(model, draft_model)
    assert sum(blind.values()) == pytest.approx(1.0, abs=1e-4)
    assert chi_square_p(counts, blind, n) < 1e-6


def test_cells_enumerated_cover_every_sample(engines) -> None:
    _, spec = engines
    probs = completion_probs(spec.engine.runner.model)
    assert len(probs) == 3**PARAMS.max_tokens
    assert all(len(cell) == PARAMS.max_tokens for cell in itertools.islice(probs, 5))
