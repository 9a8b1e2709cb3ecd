"""Sampling behaviour: seeds, penalties, logprobs, stop conditions, n > 1."""

from __future__ import annotations

import pytest
import torch

from engine_worker.engine.llm import LLM
from engine_worker.engine.sampler import apply_penalties, sample
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams

PROMPT = [0, 10, 11, 12, 13, 14]
OTHER = [[0, 50, 51], [0, 60, 61, 62, 63, 64, 65, 66, 67], [0, 7]]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), block_size=4, num_kv_blocks=256)


def test_seeded_sampling_reproducible_across_runs_and_batches(llm, tiny_llama):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    noisy = SamplingParams(max_tokens=10, temperature=1.3, ignore_eos=True)
    batched = llm.generate([*OTHER, PROMPT], [noisy] * 3 + [params])[3].outputs[0].token_ids
    fresh = LLM(str(tiny_llama), block_size=8, num_kv_blocks=64)
    again = fresh.generate([OTHER[0], PROMPT], [noisy, params])[1].outputs[0].token_ids
    assert alone == batched == again
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    assert llm.generate([PROMPT], other_seed)[0].outputs[0].token_ids != alone


def test_n_completions_share_prompt_blocks(llm):
    long_prompt = [0, *range(100, 130)]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
    res = llm.generate([long_prompt], params)[0]
    assert [c.index for c in res.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in res.outputs)
    assert len({tuple(c.token_ids) for c in res.outputs}) > 1
    assert llm.engine.block_manager.prefix_hits >= 2 * 28  # siblings reused the leader's blocks
    greedy = llm.generate([long_prompt], SamplingParams(max_tokens=6, temperature=0, n=2))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_logprobs_top_alternatives(llm):
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    comp = llm.generate([PROMPT], params)[0].outputs[0]
    assert comp.logprobs is not None and len(comp.logprobs) == 4
    for tok, lp in zip(comp.token_ids, comp.logprobs, strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob <= 0


def test_stop_token_ids_and_max_tokens(llm):
    free = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    assert free[0].outputs[0].finish_reason == "length"
    stop_at = tokens[3]
    first = tokens.index(stop_at)
    res = llm.generate(
        [PROMPT],
        SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at], ignore_eos=True),
    )[0].outputs[0]
    assert res.token_ids == tokens[: first + 1]
    assert res.finish_reason == "stop"


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    topk = llm.generate(
        [PROMPT], SamplingParams(max_tokens=8, temperature=0.8, top_k=1, seed=3, ignore_eos=True)
    )
    assert greedy[0].outputs[0].token_ids == topk[0].outputs[0].token_ids


def _seq(tokens: list[int], prompt_len: int, **kw) -> Sequence:
    return Sequence(0, "r", 0, tokens, prompt_len, SamplingParams(**kw), 0, 0)


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seq = _seq([0, 1, 2, 2], 2, frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties(logits, [seq])
    # token 2 appeared twice in the output: 0.5 - 2*0.5 - 0.25
    assert logits.tolist() == [[2.0, -1.0, -0.75, 0.0]]
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    apply_penalties(logits, [_seq([0, 1], 1, repetition_penalty=2.0)])
    assert logits.tolist() == [[1.0, -2.0, 0.5, 0.0]]


def test_min_p_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        seq = _seq([0], 1, temperature=1.0, min_p=0.5)  # keeps p >= 0.25
        (tok,), _ = sample(logits, [seq], gen)
        assert tok in (0, 1)
        seq = _seq([0], 1, temperature=1.0, top_p=0.6)  # keeps 0.5 and 0.3
        (tok,), _ = sample(logits, [seq], gen)
        assert tok in (0, 1)
