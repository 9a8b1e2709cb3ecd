"""Speculative decoding inside continuous batching gives the tokens plain decoding gives,
with either proposer: prompt lookup (ngram) or a draft model.

Greedy: token-identical to the plain engine and to Hugging Face transformers, with chunked
prefill, prefix caching, preemption, n > 1, logprobs, takeover (resume) and plain
sequences (opted out, penalties) in the same steps. A random tiny model rarely repeats
itself, so besides prompt lookup an "oracle" proposer is injected that proposes the plain
run's true continuation with random corruptions: every acceptance length gets exercised.
Seeded sampling is token-identical too (the verification draws the noise plain sampling
draws); test_spec_distribution.py checks unseeded sampling statistically.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine_worker.engine.llm import LLM
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams
from tests.support.hf_reference import hf_greedy

PROMPTS = [
    [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [0, 20, 21],
    [0, 30, 31, 32, 33, 34, 35, 36, 30, 31, 32, 33],
    [0, 5, 6, 7, 8, 5, 6, 7, 8, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50],
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


class OracleProposer:
    """Proposes what the plain run produced next, corrupted at random: a stand-in for a
    proposer that is often but not always right."""

    def __init__(self, truths: list[list[int]], seed: int = 0, p_wrong: float = 0.25) -> None:
        self.truths = truths  # full token lists (prompt + output) of the plain run
        self.rng = random.Random(seed)
        self.p_wrong = p_wrong
        self.calls = 0

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        self.calls += 1
        out = []
        for seq, limit in zip(seqs, limits, strict=True):
            history = seq.token_ids
            truth = next((t for t in self.truths if t[: len(history)] == history), None)
            guess = list(truth[len(history) : len(history) + limit]) if truth else []
            for i in range(len(guess)):
                if self.rng.random() < self.p_wrong:
                    guess[i] = (guess[i] + 1 + self.rng.randrange(50)) % 256
            out.append(guess)
        return out


def run(llm: LLM, prompts: list[list[int]], params) -> list[list[list[int]]]:
    plist = params if isinstance(params, list) else [params] * len(prompts)
    return [[c.token_ids for c in r.outputs] for r in llm.generate(prompts, plist)]


CONFIGS = {
    "default": dict(block_size=4, num_kv_blocks=256),
    "chunked_prefill": dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=7),
    "preemption": dict(block_size=2, num_kv_blocks=40, max_num_batched_tokens=16),
    "no_prefix_cache": dict(block_size=8, num_kv_blocks=64, enable_prefix_caching=False),
}


@pytest.fixture(scope="module")
def plain_greedy(tiny_llama) -> list[list[int]]:
    llm = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256)
    return [out[0] for out in run(llm, PROMPTS, GREEDY)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_oracle_matches_plain_and_hf(tiny_llama, plain_greedy, name) -> None:
    kw = CONFIGS[name]
    llm = LLM(str(tiny_llama), speculative_method="ngram", num_speculative_tokens=3, **kw)
    truths = [p + o for p, o in zip(PROMPTS, plain_greedy, strict=True)]
    oracle = OracleProposer(truths)
    llm.engine.proposer = oracle
    got = [out[0] for out in run(llm, PROMPTS, GREEDY)]
    assert got == plain_greedy
    assert plain_greedy[1] == hf_greedy(str(tiny_llama), tuple(PROMPTS[1]), GREEDY.max_tokens)
    assert plain_greedy[3] == hf_greedy(str(tiny_llama), tuple(PROMPTS[3]), GREEDY.max_tokens)
    spec = llm.engine.stats().spec
    assert spec.num_drafts > 0 and 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert spec.mean_acceptance_length > 1.5
    if name == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.block_manager.check_invariants([])
    assert llm.engine.block_manager.num_free_blocks == kw["num_kv_blocks"]


def test_ngram_greedy_matches_plain(tiny_llama, plain_greedy) -> None:
    llm = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256, speculative_method="ngram")
    assert [out[0] for out in run(llm, PROMPTS, GREEDY)] == plain_greedy
    assert llm.engine.stats().spec.num_drafts > 0  # the repeated prompts give it matches


def test_mixed_batch_matches_plain(tiny_llama) -> None:
    """Speculating, opted-out, penalized, logprob and n=2 sequences share every step."""
    params = [
        GREEDY,
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, speculative=False),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=3, n=2),
    ]
    plain = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256)
    spec = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256, speculative_method="ngram")
    want = plain.generate(PROMPTS, params)
    truths = [p + r.outputs[0].token_ids for p, r in zip(PROMPTS, want, strict=True)]
    spec.engine.proposer = OracleProposer(truths, p_wrong=0.3)
    got = spec.generate(PROMPTS, params)
    for w, g in zip(want, got, strict=True):
        for wc, gc in zip(w.outputs, g.outputs, strict=True):
            assert gc.token_ids == wc.token_ids
            assert gc.finish_reason == wc.finish_reason
            if wc.logprobs is not None:
                assert [lp.token_id for lp in gc.logprobs] == wc.token_ids
                for a, b in zip(wc.logprobs, gc.logprobs, strict=True):
                    assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
                    assert [t for t, _ in b.top] == [t for t, _ in a.top]
    assert spec.engine.stats().spec.num_accepted_tokens > 0


def test_seeded_sampling_is_token_identical(tiny_llama) -> None:
    params = SamplingParams(
        max_tokens=24, temperature=0.8, top_p=0.95, top_k=30, seed=7, n=2, ignore_eos=True
    )
    plain = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256)
    want = run(plain, PROMPTS, params)
    spec = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256, speculative_method="ngram")
    truths = [p + o for p, outs in zip(PROMPTS, want, strict=True) for o in outs]
    spec.engine.proposer = OracleProposer(truths, p_wrong=0.3)
    assert run(spec, PROMPTS, params) == want
    assert spec.engine.stats().spec.num_accepted_tokens > 0


@pytest.mark.parametrize("cut", [1, 9])
def test_takeover_resume_with_speculation(tiny_llama, cut) -> None:
    """A worker taking over a job re-prefills what another produced and continues exactly."""
    seeded = SamplingParams(max_tokens=20, temperature=0.9, seed=3, ignore_eos=True)
    for params in (GREEDY, seeded):
        plain = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256)
        full = run(plain, PROMPTS[:1], params)[0][0]
        spec = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256, speculative_method="ngram")
        spec.engine.proposer = OracleProposer([PROMPTS[0] + full], p_wrong=0.2)
        engine = spec.engine
        engine.add_request("job", PROMPTS[0], params, resume_token_ids=[full[:cut]])
        tail: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                for d in out.deltas:
                    tail.extend(d.token_ids)
        assert full[:cut] + tail == full
        assert engine.stats().spec.num_accepted_tokens > 0


def test_no_unverified_token_reaches_a_delta(tiny_llama, plain_greedy) -> None:
    """Every delta's tokens, step by step, are a prefix-extension of the plain output."""
    llm = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256, speculative_method="ngram")
    truths = [p + o for p, o in zip(PROMPTS, plain_greedy, strict=True)]
    llm.engine.proposer = OracleProposer(truths, p_wrong=0.5)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY)
    seen: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for d in out.deltas:
                seen[out.request_id].extend(d.token_ids)
                want = plain_greedy[int(out.request_id[1:])]
                assert seen[out.request_id] == want[: len(seen[out.request_id])]
                assert len(d.token_ids) <= 1 + engine.config.num_speculative_tokens


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory) -> Path:
    """Another random tiny Llama with the same tokenizer: a draft that is mostly wrong."""
    from tests.support.model_factory import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("draft-llama"), arch="llama", seed=5)


@pytest.mark.parametrize("name", ["default", "chunked_prefill", "preemption"])
def test_draft_model_greedy_matches_plain(tiny_llama, other_llama, plain_greedy, name) -> None:
    """With the target as its own draft every proposal must hold: any slip in the draft's
    KV cache (catch-up, rollback, preemption) would show as a rejection."""
    kw = CONFIGS[name]
    for draft, all_accepted in ((tiny_llama, True), (other_llama, False)):
        llm = LLM(
            str(tiny_llama),
            speculative_method="draft",
            speculative_model=str(draft),
            num_speculative_tokens=3,
            **kw,
        )
        assert [out[0] for out in run(llm, PROMPTS, GREEDY)] == plain_greedy
        spec = llm.engine.stats().spec
        assert spec.num_drafts > 0
        if all_accepted:
            assert spec.num_accepted_tokens == spec.num_draft_tokens
        if name == "preemption":
            assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.num_free_blocks == kw["num_kv_blocks"]


def test_draft_model_seeded_sampling_is_token_identical(tiny_llama) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.8, top_k=30, seed=9, n=2, ignore_eos=True)
    plain = LLM(str(tiny_llama), block_size=4, num_kv_blocks=256)
    spec = LLM(
        str(tiny_llama),
        block_size=4,
        num_kv_blocks=256,
        speculative_method="draft",
        speculative_model=str(tiny_llama),
    )
    assert run(spec, PROMPTS, params) == run(plain, PROMPTS, params)
    # The draft raced its q with the noise the verifier then drew: with q == p (the
    # target as its own draft) its picks are the target's. Argmax proposals would hold
    # only as often as the sampled token is the argmax.
    assert spec.engine.stats().spec.acceptance_rate > 0.9


def test_draft_model_must_share_the_vocabulary(tiny_llama, tmp_path) -> None:
    import json

    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["vocab_size"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="same tokenizer"):
        LLM(str(tiny_llama), speculative_method="draft", speculative_model=str(tmp_path))


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k", [3, 8])  # 4 x 9 verification rows: past the int8 kernel's 16
def test_int8_greedy_speculation_matches_plain_int8(tiny_llama, method, k) -> None:
    """Under --quantization int8 (the draft quantized too) verification rows go through
    the same int8 matmuls as plain decode rows: tokens identical to plain int8 decoding."""
    kw = dict(block_size=4, num_kv_blocks=256, quantization="int8")
    want = [out[0] for out in run(LLM(str(tiny_llama), **kw), PROMPTS, GREEDY)]
    llm = LLM(
        str(tiny_llama),
        speculative_method=method,
        speculative_model=str(tiny_llama) if method == "draft" else "",
        num_speculative_tokens=k,
        **kw,
    )
    if method == "ngram":
        truths = [p + o for p, o in zip(PROMPTS, want, strict=True)]
        llm.engine.proposer = OracleProposer(truths)
    else:
        draft = llm.engine.proposer.runner.model  # type: ignore[union-attr]
        assert draft.layers[0].mlp.down.method == "int8"
    assert [out[0] for out in run(llm, PROMPTS, GREEDY)] == want
    spec = llm.engine.stats().spec
    assert spec.num_drafts > 0 and spec.num_accepted_tokens > 0


def _acceptance(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    llm.engine.spec_counters = type(llm.engine.spec_counters)()
    run(llm, prompts, params)
    return llm.engine.stats().spec.acceptance_rate


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_draft_proposals_are_accepted_more_than_argmax(tiny_llama, seeded) -> None:
    """At temperature 1 the draft proposing from its own q (the target itself here, so
    q == p) is accepted almost always; proposing its argmax, only as often as the target
    samples the argmax."""
    params = SamplingParams(
        max_tokens=16, temperature=1.0, n=4, ignore_eos=True, seed=5 if seeded else None
    )
    llm = LLM(
        str(tiny_llama),
        block_size=4,
        num_kv_blocks=256,
        speculative_method="draft",
        speculative_model=str(tiny_llama),
        num_speculative_tokens=3,
    )
    proposer = llm.engine.proposer
    sampled = _acceptance(llm, PROMPTS, params)
    proposer.samples_proposals = False  # type: ignore[union-attr]
    argmax = _acceptance(llm, PROMPTS, params)
    assert sampled > 0.9 and sampled > argmax + 0.2, (sampled, argmax)
