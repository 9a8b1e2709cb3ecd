"""Tensor parallelism with real rank processes (gloo on CPU): greedy tokens identical to
one rank and to Hugging Face transformers, the KV cache sharded per rank, and a dead rank
an error rather than a hang; no rank outlives its engine."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.engine.parallel.launch import RankFailed
from shared.sampling_params import SamplingParams
from tests.integration.engine.test_speculative import OracleProposer
from tests.support.hf_reference import hf_greedy

PROMPTS = [
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25],
    [0, 20, 21],
    [0, 30, 31, 32, 33, 34, 35, 36],
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 99],  # a cached prefix
]
MAX_NEW = 16


def greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """All prompts at once; small step budget so long prompts prefill in chunks."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(t for d in o.deltas for t in d.token_ids)
    return [out[str(i)] for i in range(len(prompts))]


def make_engine(path: Path, tp: int, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 64)
    return LLMEngine(
        EngineConfig(
            model=str(path), tensor_parallel_size=tp, max_num_batched_tokens=12, block_size=4, **kw
        )
    )


def gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_two_ranks_decode_what_one_rank_does(fixture: str, request) -> None:
    path: Path = request.getfixturevalue(fixture)
    one = make_engine(path, 1)
    want = greedy(one, PROMPTS)
    two = make_engine(path, 2)
    try:
        assert two.parallel is not None and two.parallel.size == 2
        assert greedy(two, PROMPTS) == want
        assert two.block_manager.prefix_hit_rate > 0  # the shared prefix was reused
        assert two.num_parameters == one.num_parameters
    finally:
        two.close()
    if fixture == "tiny_llama":
        assert want == [hf_greedy(str(path), tuple(p), MAX_NEW) for p in PROMPTS]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_two_int8_ranks_decode_what_one_int8_rank_does(fixture: str, request) -> None:
    """Quantization scales are the whole weight's on every rank (row-parallel row maxima
    reduced over the ranks), so sharding changes nothing but the summation order."""
    path: Path = request.getfixturevalue(fixture)
    want = greedy(make_engine(path, 1, quantization="int8"), PROMPTS)
    two = make_engine(path, 2, quantization="int8")
    try:
        assert two.runner.model.layers[0].mlp.down.method == "int8"
        assert greedy(two, PROMPTS) == want
    finally:
        two.close()


@pytest.mark.parametrize(
    ("method", "quantization"), [("ngram", "none"), ("draft", "none"), ("draft", "int8")]
)
def test_two_ranks_speculating_decode_what_one_plain_rank_does(
    tiny_llama: Path, method: str, quantization: str
) -> None:
    """Proposals (and the draft model) live on rank 0; every rank verifies them in the
    same forward on its shard: greedy tokens as plain decoding on one rank gives."""
    want = greedy(make_engine(tiny_llama, 1, quantization=quantization), PROMPTS)
    two = make_engine(
        tiny_llama,
        2,
        quantization=quantization,
        speculative_method=method,
        speculative_model=str(tiny_llama) if method == "draft" else "",
        num_speculative_tokens=3,
    )
    try:
        if method == "ngram":  # a random model rarely repeats itself: propose near-truths
            truths = [p + o for p, o in zip(PROMPTS, want, strict=True)]
            two.proposer = OracleProposer(truths)
        assert greedy(two, PROMPTS) == want
        spec = two.stats().spec
        assert spec.num_drafts > 0 and spec.num_accepted_tokens > 0
    finally:
        two.close()


def test_kv_cache_is_sharded_and_budgeted_per_rank(tiny_llama: Path) -> None:
    budget = 1 << 20
    one = make_engine(tiny_llama, 1, num_kv_blocks=None, kv_cache_memory=budget)
    two = make_engine(tiny_llama, 2, num_kv_blocks=None, kv_cache_memory=budget)
    try:
        k_one, k_two = one.runner.kv_caches[0][0], two.runner.kv_caches[0][0]
        assert k_two.shape[2] * 2 == k_one.shape[2] == one.model_config.num_kv_heads
        # Each rank spends the whole budget on half the heads: twice the blocks.
        assert two.block_manager.num_blocks == 2 * one.block_manager.num_blocks
    finally:
        two.close()


def test_rank_zero_pays_for_the_draft_cache_and_every_rank_takes_its_count(
    tiny_llama: Path,
) -> None:
    """The draft lives on rank 0: its share of the budget holds the target's half-width
    blocks plus the draft's whole ones, the fewest of any rank, so all take that many."""
    from engine_worker.engine.model_runner import kv_bytes_per_block

    budget = 1 << 20
    two = make_engine(
        tiny_llama,
        2,
        num_kv_blocks=None,
        kv_cache_memory=budget,
        speculative_method="draft",
        speculative_model=str(tiny_llama),
    )
    try:
        half = kv_bytes_per_block(two.rank_config, 4, two.dtype)
        whole = kv_bytes_per_block(two.model_config, 4, two.dtype)
        assert half * 2 == whole
        assert two.block_manager.num_blocks == budget // (half + whole)
        assert greedy(two, PROMPTS[:2])  # and decodes in them
    finally:
        two.close()


def test_close_stops_the_ranks(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama, 2)
    pid = engine.ranks.procs[0].pid  # type: ignore[union-attr]
    engine.close()
    assert gone(pid)
    engine.check_health()  # closed: nothing left to fail


def test_a_dead_rank_is_an_error_idle_and_mid_step(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama, 2)
    proc = engine.ranks.procs[0]  # type: ignore[union-attr]
    try:
        assert greedy(engine, PROMPTS[:1])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(RankFailed, match=rf"rank 1 \(pid {proc.pid}\) exited with code -9"):
            engine.check_health()
        engine.add_request("late", PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0))
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            for _ in range(10):
                engine.step()
    finally:
        engine.close()


def test_ranks_leave_with_a_killed_rank_zero(tiny_llama: Path, tmp_path: Path) -> None:
    """SIGKILL gives rank 0 no chance to clean up; its rank notices it is orphaned."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from engine_worker.engine.config import EngineConfig\n"
        "from engine_worker.engine.llm_engine import LLMEngine\n"
        f"e = LLMEngine(EngineConfig(model={str(tiny_llama)!r}, tensor_parallel_size=2,"
        " num_kv_blocks=16))\n"
        "print(e.ranks.procs[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        rank_pid = int(leader.stdout.readline())  # type: ignore[union-attr]
        leader.kill()
        leader.wait(10)
        assert gone(rank_pid), "rank 1 outlived its rank 0"
    finally:
        leader.kill()


def test_sizes_that_do_not_divide_the_heads_fail_before_any_rank_starts(
    tiny_llama: Path,
) -> None:
    with pytest.raises(ValueError, match="does not divide the model's attention heads"):
        make_engine(tiny_llama, 3)
