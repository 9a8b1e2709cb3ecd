"""Resuming a request from tokens another engine produced equals an uninterrupted run.

This is what a worker relies on when it takes over a redelivered job: it re-prefills
prompt + produced tokens and continues. For greedy and seeded sampling the continuation
must be token-for-token the uninterrupted run's tail, with the same finish reasons.
"""

from __future__ import annotations

import pytest

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams

PROMPT = [0, 10, 11, 12, 13, 14, 15, 16, 17, 18]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), block_size=4, num_kv_blocks=256)


def run(llm: LLM, params: SamplingParams, resume: list[list[int]] | None = None):
    """Drive the engine directly: {index: (tokens, logprobs, finish_reason)} of new output."""
    engine = llm.engine
    rid = f"r{id(params)}-{len(engine.requests)}-{resume!r:.40}"
    engine.add_request(rid, PROMPT, params, resume_token_ids=resume)
    got: dict[int, tuple[list[int], list, str | None]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            assert out.num_prompt_tokens == len(PROMPT)
            for d in out.deltas:
                tokens, lps, _ = got.setdefault(d.index, ([], [], None))
                tokens.extend(d.token_ids)
                lps.extend(d.logprobs or [])
                got[d.index] = (tokens, lps, d.finish_reason or got[d.index][2])
    return got


PARAMS = {
    "greedy": SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=2),
    "seeded_n2_penalties": SamplingParams(
        max_tokens=14,
        temperature=0.9,
        top_p=0.9,
        top_k=40,
        seed=123,
        n=2,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        ignore_eos=True,
        logprobs=1,
    ),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("cuts", [(1, 1), (4, 9), (13, 0)])
def test_resumed_run_equals_uninterrupted(llm: LLM, name: str, cuts: tuple[int, int]) -> None:
    params = PARAMS[name]
    full = run(llm, params)
    assert all(len(full[i][0]) == 14 for i in range(params.n))
    resume = [full[i][0][: cuts[i]] for i in range(params.n)]
    rest = run(llm, params, resume)
    for i in range(params.n):
        tokens, lps, reason = rest[i]
        assert resume[i] + tokens == full[i][0]
        assert reason == full[i][2] == "length"
        # Logprobs of the continuation are those of the uninterrupted run's tail (the
        # re-prefill computes the same distribution, up to float summation order).
        tail = full[i][1][cuts[i] :]
        assert [lp.token_id for lp in lps] == [lp.token_id for lp in tail]
        for a, b in zip(lps, tail, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_finished_completion_is_not_run_again(llm: LLM) -> None:
    params = PARAMS["seeded_n2_penalties"]
    full = run(llm, params)
    # Completion 0 already produced all its tokens; only completion 1 continues.
    rest = run(llm, params, [full[0][0], full[1][0][:5]])
    assert set(rest) == {1}
    assert full[1][0][:5] + rest[1][0] == full[1][0]
    assert rest[1][2] == "length"


def test_resume_after_stop_token_is_finished(llm: LLM) -> None:
    free = run(llm, PARAMS["greedy"])[0][0]
    stop_at = free[3]
    params = SamplingParams(max_tokens=14, temperature=0.0, stop_token_ids=[stop_at], n=2)
    cut = free[: free.index(stop_at) + 1]
    # Index 0 ended on its stop token; index 1 (greedy, identical) resumes one token earlier.
    rest = run(llm, params, [cut, cut[:-1]])
    assert set(rest) == {1}
    assert rest[1] == ([stop_at], [], "stop")
    with pytest.raises(ValueError, match="already finished"):
        llm.engine.add_request("done", PROMPT, params, resume_token_ids=[cut, cut])
    assert "done" not in llm.engine.requests


@pytest.mark.parametrize(
    ("resume", "message"),
    [
        ([[1, 2]], "entries for n=2"),
        ([[1], [10**6]], "integers in"),
        ([[1] * 15, []], "exceed max_tokens"),
    ],
)
def test_bad_resume_is_rejected(llm: LLM, resume: list[list[int]], message: str) -> None:
    params = SamplingParams(max_tokens=14, n=2)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", PROMPT, params, resume_token_ids=resume)
    assert not llm.engine.has_unfinished_requests()
