"""The draft-model proposer: a smaller checkpoint of the same tokenizer proposes its own
continuation, run in the engine's process with its own paged KV cache.

The draft's cache has as many blocks as the target's and is indexed by the same block
tables, so the block manager's accounting (allocation, preemption, prefix caching,
rollback of rejected tokens) covers both caches at once. It proposes after the
scheduler has allocated the step's blocks: the scheduler reserves room for the proposals
(placeholders of the right length), then `fill` computes them into that room. Per
sequence it remembers how many positions of its own cache hold valid keys and values
(never more than the target has verified), and catches up on the rest (a new prompt,
accepted tokens, a re-prefill after preemption) in the step's first draft forward.

What it proposes, per request:
- greedy: its argmax, verified by the target's argmax;
- unseeded sampling: a draw from its own distribution q (its logits under the request's
  temperature, top-k, top-p and min-p), with q kept for verify.py's rejection sampler
  (Leviathan et al.: keep with probability min(1, p/q), else draw from max(0, p - q));
- seeded sampling: the exponential race over q run with the very noise vectors the
  verifier will draw from the request's generator (peeked, not consumed), as a point
  mass: verification then emits exactly what plain sampling emits (same seed, same
  tokens, and a takeover's generator replay holds), while the shared noise makes the
  draft's pick agree with the target's whenever q is close to p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine_worker.engine.attention.backend import select_backend
from engine_worker.engine.config import ModelConfig, load_model_config
from engine_worker.engine.model_runner import ModelRunner, allocate_kv_cache
from engine_worker.engine.models.layers import layer_ops_for
from engine_worker.engine.models.linear import bind_weight_matmuls
from engine_worker.engine.models.llama import LlamaForCausalLM
from engine_worker.engine.models.loader import build_model, load_weights
from engine_worker.engine.models.quantization import quantize_model
from engine_worker.engine.sampler import sampling_probs
from engine_worker.engine.sequence import Sequence


@dataclass
class _DraftView:
    """What the runner reads of a sequence, as the draft model sees it."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass
class _Progress:
    num_preemptions: int  # a preemption freed the blocks: the draft's KV went with them
    num_computed: int  # positions whose draft KV is valid (if the tokens there still hold)


def load_draft_model(
    model_dir: str | Path,
    target: ModelConfig,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device,
    backend_name: str,
    quantization: str = "none",
) -> LlamaForCausalLM:
    """The draft's weights, loaded before the KV cache is sized (on CUDA the budget is
    what the weights leave). `quantization`: the target's --quantization, applied to the
    draft too (a draft forward is bound by its weight bytes as much as the target's)."""
    cfg = load_model_config(model_dir)
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({cfg.vocab_size}) is not the target's "
            f"({target.vocab_size}): a draft needs the same tokenizer"
        )
    if cfg.max_position_embeddings < max_positions:
        raise ValueError(
            f"the draft model takes {cfg.max_position_embeddings} positions, fewer "
            f"than the target's context ({max_positions}); set --max-model-len"
        )
    ops = layer_ops_for(backend_name)
    model = build_model(cfg, dtype, device, max_positions=max_positions, ops=ops)
    load_weights(model, Path(model_dir))
    if quantization != "none":
        quantize_model(model, quantization)
    if ops.matmul_for is not None:
        bind_weight_matmuls(model, ops.matmul_for)
    return model


class DraftModelProposer:
    needs_blocks = True  # proposes into the blocks the scheduler allocated for the step
    # False: propose the draft's argmax for every request (point masses), as before the
    # rejection sampler; benchmarks compare the two side by side.
    samples_proposals = True

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        backend_name: str,
    ) -> None:
        """`model` from `load_draft_model`; its cache gets `num_blocks` blocks, as many as
        the target's (the KV budget paid for both: kv_budget.py `blocks_in_budget`), in the
        target's KV cache dtype."""
        kv = allocate_kv_cache(model.cfg, num_blocks, block_size, kv_dtype, device)
        self.config = model.cfg
        self.runner = ModelRunner(
            model, kv, select_backend(backend_name, device), block_size, device
        )
        self._progress: dict[int, _Progress] = {}

    def _valid_prefix(self, seq: Sequence) -> int:
        p = self._progress.get(seq.seq_id)
        if p is None or p.num_preemptions != seq.num_preemptions:
            return 0
        return min(p.num_computed, seq.num_computed_tokens)

    def fill(self, seqs: list[Sequence], generator: torch.Generator | None = None) -> None:
        """Replace each sequence's placeholder proposals with the draft's: its argmax for
        greedy requests, a draw from its own sampling distribution q otherwise (see the
        module's docstring); `generator` is the engine's, for unseeded requests."""
        progress: dict[int, _Progress] = {}
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        noise = {
            i: peek_noise(s.generator, len(s.spec_token_ids), self.config.vocab_size)
            for i, s in enumerate(seqs)
            if s.generator is not None and not s.params.greedy and self.samples_proposals
        }
        # First forward: catch up on every position not yet in the draft's cache, ending
        # at the last real token, whose logits give the first proposal.
        views = [
            _DraftView(seq.token_ids, self._valid_prefix(seq), seq.block_table) for seq in seqs
        ]
        items = [(v, len(v.token_ids) - v.num_computed_tokens) for v in views]
        want = list(range(len(seqs)))
        for j in range(max(len(s.spec_token_ids) for s in seqs)):
            if j:  # then one decode per further proposal, for the sequences that want more
                want = [i for i, s in enumerate(seqs) if len(s.spec_token_ids) > j]
                items = [
                    (
                        _DraftView(
                            [*seqs[i].token_ids, *drafts[i]],
                            seqs[i].num_tokens + j - 1,
                            seqs[i].block_table,
                        ),
                        1,
                    )
                    for i in want
                ]
            logits = self._logits(items)
            rows = [noise[i][j] if i in noise else None for i in want]
            chosen = [seqs[i] for i in want]
            if self.samples_proposals:
                tokens, qs = propose_from(logits, chosen, rows, generator)
            else:
                tokens, qs = logits.argmax(dim=-1).tolist(), [None] * len(want)
            for i, token, q in zip(want, tokens, qs, strict=True):
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
        for i, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
            seq.spec_token_ids = draft[: len(seq.spec_token_ids)]
            seq.spec_draft_probs = torch.stack(probs[i]) if probs[i] else None
            # Its cache now holds the real tokens and every proposal but the last.
            progress[seq.seq_id] = _Progress(
                seq.num_preemptions, seq.num_tokens + len(seq.spec_token_ids) - 1
            )
        self._progress = progress

    def _logits(self, items: list[tuple[_DraftView, int]]) -> torch.Tensor:
        """The draft's next-token logits after each item's tokens, one row per item in
        the items' order (the runner takes decodes first)."""
        order = sorted(range(len(items)), key=lambda i: items[i][1] != 1)
        logits = self.runner.execute([items[i] for i in order], [True] * len(items))  # type: ignore[misc]
        if order == sorted(order):
            return logits
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return logits[inverse.to(logits.device)]


def peek_noise(gen: torch.Generator, n: int, vocab: int) -> torch.Tensor:
    """The next `n` Exp(1) noise vectors `gen` will give the verifier (one per emitted
    token, drawn the way verify.py draws them), leaving `gen` where it was."""
    state = gen.get_state()
    out = torch.empty(n, vocab, dtype=torch.float32, device=gen.device)
    for row in out:
        row.exponential_(generator=gen)
    gen.set_state(state)
    return out


def propose_from(
    logits: torch.Tensor,
    seqs: list[Sequence],
    noise: list[torch.Tensor | None],
    generator: torch.Generator | None,
) -> tuple[list[int], list[torch.Tensor | None]]:
    """One proposal per row and the distribution it was drawn from (None: a point mass).

    Greedy: the argmax. Seeded: the exponential race over q with the noise the verifier
    will draw (`noise[row]`), a point mass to verification. Unseeded: a draw from q with
    the engine's generator, and q itself, for the rejection sampler."""
    tokens = logits.argmax(dim=-1)
    qs: list[torch.Tensor | None] = [None] * len(seqs)
    rows = [r for r, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        q = sampling_probs(logits[rows].float(), [seqs[r] for r in rows])
        race = torch.empty_like(q)
        for k, r in enumerate(rows):
            given = noise[r]
            if given is not None:
                race[k] = given
            else:
                race[k].exponential_(generator=generator)
                qs[r] = q[k]
        tokens[rows] = (q / race).argmax(dim=-1).to(tokens.dtype)
    return tokens.tolist(), qs
