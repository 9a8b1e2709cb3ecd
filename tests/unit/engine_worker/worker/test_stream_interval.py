"""--stream-interval: a job's tokens wait until a completion has N unsent ones; nothing is
lost, reordered or duplicated, and the first and last Deltas are never held."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.outputs import CompletionDelta, RequestOutput, TokenLogprob
from engine_worker.worker.job_state import JobState, delta_from_output, merge_chunks
from shared.messages import CompletionChunk, Job, SamplingParams


def _state(n: int) -> JobState:
    job = Job(
        id="j",
        model="m",
        prompt_token_ids=[1, 2],
        sampling=SamplingParams(max_tokens=64, n=n, seed=1),
        created_at=time.time(),
        reply_to="llm.events.j",
    )
    return JobState(job, msg=None)


# Per step: for each of n completions, how many tokens it made (0 = none this step).
steps_strategy = st.integers(1, 3).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.lists(st.integers(0, 3), min_size=n, max_size=n), min_size=1, max_size=25),
        st.integers(1, 6),
    )
)


@settings(max_examples=300, deadline=None)
@given(steps_strategy)
def test_held_tokens_all_arrive_in_order_and_bursts_respect_the_interval(case) -> None:
    n, steps, interval = case
    state = _state(n)
    made: dict[int, list[int]] = {i: [] for i in range(n)}
    sent: dict[int, list[int]] = {i: [] for i in range(n)}
    deltas = []
    token = 100
    for k, counts in enumerate(steps):
        last = k == len(steps) - 1
        parts = []
        for i, c in enumerate(counts):
            ids = list(range(token, token + c))
            token += c
            made[i] += ids
            lps = [TokenLogprob(t, -1.0, []) for t in ids]
            parts.append(CompletionDelta(i, ids, lps, "length" if last else None))
        out = RequestOutput("j", parts, last, 2, 0)
        delta = delta_from_output(state, out, "w", interval)
        if interval == 1 or k == 0 or last:
            assert delta is not None  # never held: every token at once, the first, the last
        if delta is None:
            continue
        deltas.append(delta)
        for c in delta.chunks:
            sent[c.index] += c.token_ids
            assert [lp[0] for lp in c.logprobs or []] == c.token_ids  # logprobs stay aligned
    assert sent == made
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    if interval > 1:  # then a middle Delta goes once some completion has a full burst
        for d in deltas[1:-1]:
            assert max(len(c.token_ids) for c in d.chunks) >= interval
    else:
        assert len(deltas) == len(steps)  # interval 1: a Delta per engine output, as before
    assert deltas[-1].usage.completion_tokens == sum(len(t) for t in made.values())
    assert state.held == []


def test_merge_chunks_keeps_index_order() -> None:
    a = [CompletionChunk(0, [1]), CompletionChunk(1, [2], [(2, -0.1, [])])]
    b = [CompletionChunk(1, [3], [(3, -0.2, [])], "stop"), CompletionChunk(2, [4])]
    merged = merge_chunks(a, b)
    assert [(c.index, c.token_ids, c.finish_reason) for c in merged] == [
        (0, [1], None),
        (1, [2, 3], "stop"),
        (2, [4], None),
    ]
    assert merged[1].logprobs == [(2, -0.1, []), (3, -0.2, [])]
