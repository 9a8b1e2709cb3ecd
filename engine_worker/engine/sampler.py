"""Turn a step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeds.

Sampling uses the exponential-race trick (argmax of p / Exp(1) noise), which draws
exactly from p and lets each seeded sequence take its noise from its own generator,
so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine_worker.engine.host_tensors import to_device
from engine_worker.engine.outputs import TokenLogprob
from engine_worker.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition (HF, over prompt and output); presence/frequency (OpenAI, output)."""
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            seen = seen[seen < vocab]
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            if out.numel():
                counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask what top-k, top-p and min-p exclude (rows of greedy sequences untouched).
    Which filters run is decided from the host's parameters, never from device values."""
    device, vocab = logits.device, logits.shape[-1]
    if any(0 < s.params.top_k < vocab or s.params.top_p < 1.0 for s in seqs):
        top_k = to_device([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], device)
        top_p = to_device([s.params.top_p for s in seqs], device)
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=device)[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs
        drop |= cum_before >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
    if any(s.params.min_p > 0 for s in seqs):
        min_p = to_device([s.params.min_p for s in seqs], device)
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sampling_probs(
    logits: torch.Tensor, seqs: list[Sequence], temps: torch.Tensor | None = None
) -> torch.Tensor:
    """The distribution each row's token is drawn from: temperature, then top-k/top-p/min-p
    (penalties and grammar masks already applied); `temps` defaults to the rows' own."""
    if temps is None:
        temps = to_device(
            [1.0 if s.params.greedy else s.params.temperature for s in seqs], logits.device
        )
    return _filter(logits / temps[:, None], seqs).softmax(dim=-1)


def token_logprob(raw_logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """One row's logprob of `token` and its top `k` alternatives (raw model distribution)."""
    top: list[tuple[int, float]] = []
    if k:
        vals, ids = raw_logprobs.topk(k)
        top = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token, float(raw_logprobs[token]), top)


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@dataclass
class SampledRows:
    """A step's sampled tokens, and the logprob tensors its rows asked for, before the
    host reads them: async scheduling feeds `tokens` to the next step on the device and
    reads the rows only once that step is launched."""

    tokens: torch.Tensor
    chosen: torch.Tensor | None = None  # raw logprob of each row's token
    top_vals: torch.Tensor | None = None  # [rows, k_max] alternatives, when asked
    top_ids: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # set on the host copy of a CUDA step's rows

    def copy_to_host(self) -> SampledRows:
        """Start the device-to-host copy without waiting for it (the copy lands in
        pinned memory); on the CPU the rows already are the host's."""
        if self.tokens.device.type != "cuda":
            return self

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)

        copy = SampledRows(
            host(self.tokens), host(self.chosen), host(self.top_vals), host(self.top_ids)
        )
        copy.ready = torch.cuda.Event(blocking=True)  # the host sleeps, it does not spin
        copy.ready.record()
        return copy


def sample_rows(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generator: torch.Generator | None = None,
    apply_mask: Callable[[torch.Tensor], None] | None = None,
    argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax,
) -> SampledRows:
    """One token per row, left on the device; see `sample`."""
    logits = logits.float()
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None
    if apply_mask is not None:
        apply_mask(logits)  # the step's own logits tensor; raw logprobs are already taken
    if any(s.params.needs_penalties for s in seqs):
        logits = logits.clone()
        apply_penalties(logits, seqs)
    tokens = argmax(logits)
    if not all(s.params.greedy for s in seqs):
        greedy = to_device([s.params.greedy for s in seqs], logits.device)
        temps = to_device(
            [1.0 if s.params.greedy else s.params.temperature for s in seqs], logits.device
        )
        probs = sampling_probs(logits, seqs, temps)
        noise = torch.empty_like(probs)
        for row, seq in enumerate(seqs):
            if not seq.params.greedy:
                noise[row].exponential_(generator=seq.generator or generator)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(greedy, tokens, sampled)
    rows = SampledRows(tokens)
    if raw_logprobs is not None:
        rows.chosen = raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        k_max = max(s.params.logprobs or 0 for s in seqs)
        if k_max:
            rows.top_vals, rows.top_ids = raw_logprobs.topk(k_max, dim=-1)
    return rows


def read_rows(
    rows: SampledRows, seqs: list[Sequence]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The host's view of sampled rows: token ids, and logprobs where a row asked."""
    if rows.ready is not None:
        rows.ready.synchronize()
    token_list = rows.tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    if rows.chosen is not None:
        chosen = rows.chosen.tolist()
        for row, seq in enumerate(seqs):
            k = seq.params.logprobs
            if k is None:
                continue
            top = []
            if k and rows.top_ids is not None and rows.top_vals is not None:
                top = list(
                    zip(
                        rows.top_ids[row, :k].tolist(), rows.top_vals[row, :k].tolist(), strict=True
                    )
                )
            logprobs[row] = TokenLogprob(token_list[row], chosen[row], top)
    return token_list, logprobs


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generator: torch.Generator | None = None,
    apply_mask: Callable[[torch.Tensor], None] | None = None,
    argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row; logprobs are of the raw model distribution, as vLLM reports them.

    `apply_mask` (structured outputs) sets the grammar-forbidden logits of constrained
    rows to -inf in place, before penalties, temperature and filters see them. `argmax`
    picks the greedy rows' tokens (``logits.argmax(-1)``'s result, perhaps faster).
    """
    return read_rows(sample_rows(logits, seqs, generator, apply_mask, argmax), seqs)
