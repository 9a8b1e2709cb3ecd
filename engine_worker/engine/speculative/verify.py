"""Check a sequence's proposed tokens against the model's logits at each of their positions.

Row i of the logits is the model's next-token distribution after the sequence's tokens and
the first i proposals. Greedy: proposals are kept while they equal the row's argmax, and
the first row that disagrees (or the row after the last proposal) adds the model's own
token, so the output is exactly what plain greedy decoding gives.

Sampled: Leviathan et al.'s rejection sampling keeps proposal d drawn from q with
probability min(1, p(d) / q(d)) and, on rejection, draws from norm(max(0, p - q)). The
proposals here are point masses (prompt lookup is deterministic), so that is: keep d with
probability p(d), else draw from p with d removed. Drawing t from p and keeping d exactly
when t == d realises both at once: P(keep) = p(d), and a rejected t is distributed as p
given t != d. It is done with the sampler's own exponential race, one noise vector per
emitted token from the sequence's generator, the noise plain sampling draws: so the
tokens are the ones plain sampling would have produced, a seeded request gets the same
tokens with or without speculation, and a takeover's generator replay stays valid.
"""

from __future__ import annotations

import torch

from engine_worker.engine.outputs import TokenLogprob
from engine_worker.engine.sampler import sampling_probs, token_logprob
from engine_worker.engine.sequence import Sequence


def accepted_prefix(proposals: list[int], targets: list[int]) -> int:
    """How many leading proposals equal the model's tokens at their positions."""
    n = 0
    for d, t in zip(proposals, targets, strict=False):
        if d != t:
            break
        n += 1
    return n


def verify(
    logits: torch.Tensor, seq: Sequence, generator: torch.Generator | None
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The tokens to emit (accepted proposals, then the model's next token) and their
    logprobs (None entries when the request asked for none). `logits` has one row per
    proposal plus one."""
    proposals = seq.spec_token_ids
    assert logits.shape[0] == len(proposals) + 1
    logits = logits.float()
    if seq.params.greedy:
        targets = logits.argmax(dim=-1).tolist()
        n = accepted_prefix(proposals, targets)
        tokens = [*proposals[:n], targets[n]]
    else:
        tokens = _sample_until_rejected(logits, seq, proposals, generator)
    k = seq.params.logprobs
    if k is None:
        return tokens, [None] * len(tokens)
    raw = logits[: len(tokens)].log_softmax(dim=-1)
    return tokens, [token_logprob(raw[i], t, k) for i, t in enumerate(tokens)]


def _sample_until_rejected(
    logits: torch.Tensor, seq: Sequence, proposals: list[int], generator: torch.Generator | None
) -> list[int]:
    probs = sampling_probs(logits, [seq] * logits.shape[0])
    gen = seq.generator or generator
    noise = torch.empty(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    tokens: list[int] = []
    for i in range(probs.shape[0]):
        noise.exponential_(generator=gen)
        token = int((probs[i] / noise).argmax())
        tokens.append(token)
        if i == len(proposals) or token != proposals[i]:
            break
    return tokens
