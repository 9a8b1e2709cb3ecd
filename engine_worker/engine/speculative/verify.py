"""Check a sequence's proposed tokens against the model's logits at each of their positions.

Row i of the logits is the model's next-token distribution after the sequence's tokens and
the first i proposals. Greedy: proposals are kept while they equal the row's argmax, and
the first row that disagrees (or the row after the last proposal) adds the model's own
token, so the output is exactly what plain greedy decoding gives.

Sampled: Leviathan et al.'s rejection sampling keeps proposal d drawn from q with
probability min(1, p(d) / q(d)) and, on rejection, draws from norm(max(0, p - q)); when
every proposal holds, the bonus token is drawn from p. The emitted tokens are distributed
exactly as plain sampling's, whatever q is. Two cases:

- q given (`seq.spec_draft_probs`: a draft model sampled its proposals for an unseeded
  request): exactly that, with the engine's generator. The closer q is to p, the more
  proposals hold (1 - TV(p, q) per position).
- point masses (prompt lookup, greedy-drafted or seeded proposals): the rule becomes keep
  d with probability p(d), else draw from p with d removed. Drawing t from p and keeping
  d exactly when t == d realises both at once: P(keep) = p(d), and a rejected t is
  distributed as p given t != d. It is done with the sampler's own exponential race, one
  noise vector per emitted token from the sequence's generator, the noise plain sampling
  draws: so the tokens are the ones plain sampling would have produced, a seeded request
  gets the same tokens with or without speculation, and a takeover's generator replay
  stays valid.
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
    elif seq.spec_draft_probs is not None:
        tokens = _rejection_sample(logits, seq, proposals, seq.spec_draft_probs, generator)
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


def _rejection_sample(
    logits: torch.Tensor,
    seq: Sequence,
    proposals: list[int],
    q: torch.Tensor,
    generator: torch.Generator | None,
) -> list[int]:
    """Leviathan et al. against the draft's distributions `q` [proposals, vocab]."""
    assert q.shape[0] == len(proposals)
    p = sampling_probs(logits, [seq] * logits.shape[0])
    k = len(proposals)
    gen = seq.generator or generator
    ids = torch.tensor(proposals, device=p.device)
    rows = torch.arange(k, device=p.device)
    p_d, q_d = p[rows, ids], q[rows, ids].to(p.dtype)
    u = torch.rand(k, dtype=p.dtype, device=p.device, generator=gen)
    held = (u * q_d <= p_d).tolist()  # P(u <= p/q) = min(1, p/q); q(d) > 0 as d ~ q
    n = held.index(False) if False in held else k
    if n < k:
        residual = (p[n] - q[n].to(p.dtype)).clamp_(min=0)
        if not bool(residual.sum() > 0):  # p == q up to rounding: nothing to correct
            residual = p[n]
        last = residual
    else:
        last = p[k]  # every proposal held: the bonus token from the model itself
    noise = torch.empty_like(last).exponential_(generator=gen)
    return [*proposals[:n], int((last / noise).argmax())]
