"""Property test of async scheduling on the simulated device: any interleaving of adds,
aborts and steps, with a cache small enough to preempt, gives every request the tokens
an uninterrupted synchronous run gives (they are a function of the context), loses no
request and leaks no KV block."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.factory import build_engine
from engine_worker.engine.simulated.tokens import allowed_token_ids, next_token
from shared.sampling_params import SamplingParams

add = st.tuples(
    st.just("add"),
    st.lists(st.integers(3, 60), min_size=1, max_size=30),  # prompt
    st.integers(1, 14),  # max_tokens
    st.integers(1, 2),  # n
    st.one_of(st.none(), st.integers(0, 13)),  # stop at the output token with this index
)
ops = st.lists(
    st.one_of(add, st.tuples(st.just("abort"), st.integers(0, 30)), st.just(("step",))),
    max_size=60,
)


def expected(prompt: list[int], params: SamplingParams, allowed: list[int]) -> tuple[list, str]:
    context = list(prompt)
    for _ in range(params.max_tokens):
        context.append(next_token(context, allowed))
        if context[-1] in params.stop_token_ids:
            return context[len(prompt) :], "stop"
    return context[len(prompt) :], "length"


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 40), max_seqs=st.integers(1, 6))
def test_async_steps_lose_nothing_and_leak_nothing(
    tiny_llama: Path, ops: list, num_blocks: int, max_seqs: int
) -> None:
    engine = build_engine(
        EngineConfig(
            model=str(tiny_llama),
            load_format="simulated",
            simulate_profile="h100-llama3-8b",
            num_kv_blocks=num_blocks,
            block_size=4,
            max_num_seqs=max_seqs,
            max_num_batched_tokens=16,
            max_model_len=num_blocks * 4,
        )
    )
    assert engine.async_scheduling
    allowed = allowed_token_ids(engine.model_config.vocab_size, engine.eos_token_ids)
    want: dict[str, dict[int, tuple[list, str]]] = {}
    got: dict[str, dict[int, tuple[list, str | None]]] = {}
    ids: list[str] = []

    def collect() -> None:
        for out in engine.step():
            for d in out.deltas:
                tokens, reason = got[out.request_id].setdefault(d.index, ([], None))
                tokens.extend(d.token_ids)
                got[out.request_id][d.index] = (tokens, d.finish_reason or reason)

    for op in ops:
        if op[0] == "add":
            _, prompt, max_tokens, n, stop_at = op
            if len(prompt) + max_tokens > num_blocks * 4:
                continue
            params = SamplingParams(max_tokens=max_tokens, n=n, temperature=0.0)
            if stop_at is not None and stop_at < max_tokens:
                params.stop_token_ids = [expected(prompt, params, allowed)[0][stop_at]]
            rid = f"r{len(ids)}"
            engine.add_request(rid, prompt, params)
            ids.append(rid)
            want[rid] = {i: expected(prompt, params, allowed) for i in range(n)}
            got[rid] = {}
        elif op[0] == "abort" and op[1] < len(ids):
            engine.abort_request(ids[op[1]])
            want.pop(ids[op[1]], None)
        else:
            collect()
    while engine.has_unfinished_requests():
        collect()
    collect()  # a step still in flight holds only finished sequences: nothing to emit

    for rid, completions in want.items():
        assert got[rid] == completions, rid
    for rid in set(got) - set(want):  # aborted: a prefix of the run, ended by the abort
        assert all(reason in ("abort", "stop", "length") for _, reason in got[rid].values())
    bm = engine.block_manager
    assert not engine.requests and bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])
