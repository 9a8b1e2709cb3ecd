"""Embedding requests in the engine: prefill-only sequences batched beside generation,
their pooled hidden states checked against Hugging Face transformers on the same weights."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from shared.sampling_params import SamplingParams

PROMPTS = [
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25],
    [0, 20, 21],
    [0, 30, 31, 32, 33, 34, 35, 36],
]


@cache
def hf_hidden(path: str, prompt: tuple[int, ...]) -> torch.Tensor:
    """The base model's last_hidden_state (after the final norm), fp32."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).last_hidden_state[0]


def reference(path: Path, prompt: list[int], pooling: str, normalize: bool) -> torch.Tensor:
    hidden = hf_hidden(str(path), tuple(prompt))
    vec = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return torch.nn.functional.normalize(vec, dim=0) if normalize else vec


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    embeddings: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    reasons: dict[str, str] = {}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            for d in out.deltas:
                tokens[out.request_id] += d.token_ids
                if d.finish_reason:
                    reasons[out.request_id] = d.finish_reason
            if out.embedding is not None:
                assert out.finished
                embeddings[out.request_id] = out.embedding
    return embeddings, tokens, reasons, steps


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_pooled_hidden_states_equal_transformers(arch: str, request) -> None:
    path = request.getfixturevalue(arch)
    # A small token budget: the 23-token prompt is prefilled in several chunks.
    engine = LLMEngine(EngineConfig(model=str(path), max_num_batched_tokens=8, num_kv_blocks=64))
    requests = {
        f"{pooling}-{norm}-{i}": (p, SamplingParams(pooling=pooling, normalize=norm))
        for i, p in enumerate(PROMPTS)
        for pooling in ("last", "mean")
        for norm in (True, False)
    }
    embeddings, tokens, reasons, _ = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        got = torch.tensor(embeddings[rid])
        ref = reference(path, prompt, params.pooling, params.normalize)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert tokens[rid] == [] and reasons[rid] == "stop"
        if params.normalize:
            assert abs(got.norm().item() - 1.0) < 1e-5


def test_embeddings_batch_beside_generation_without_changing_it(tiny_llama: Path) -> None:
    cfg = dict(model=str(tiny_llama), max_num_batched_tokens=16, num_kv_blocks=64)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone, alone_tokens, _, _ = run(LLMEngine(EngineConfig(**cfg)), {"g": (PROMPTS[0], greedy)})
    mixed = {
        "g": (PROMPTS[0], greedy),
        "e0": (PROMPTS[1], SamplingParams(pooling="mean")),
        "e1": (PROMPTS[2], SamplingParams(pooling="last")),
    }
    engine = LLMEngine(EngineConfig(**cfg))
    embeddings, tokens, _, _ = run(engine, mixed)
    assert tokens["g"] == alone_tokens["g"] and len(tokens["g"]) == 10
    assert set(embeddings) == {"e0", "e1"}
    ref = reference(tiny_llama, PROMPTS[1], "mean", True)
    torch.testing.assert_close(torch.tensor(embeddings["e0"]), ref, atol=1e-4, rtol=1e-4)
    assert alone == {} and not engine.has_unfinished_requests()


def test_a_cached_prefix_is_not_skipped(tiny_llama: Path) -> None:
    """Prefix caching may hold the prompt's blocks; mean pooling still sees every position."""
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), block_size=4, num_kv_blocks=64))
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    run(engine, {"warm": (PROMPTS[0], greedy)})
    embeddings, *_ = run(engine, {"e": (PROMPTS[0], SamplingParams(pooling="mean"))})
    ref = reference(tiny_llama, PROMPTS[0], "mean", True)
    torch.testing.assert_close(torch.tensor(embeddings["e"]), ref, atol=1e-4, rtol=1e-4)


def test_bad_pooling_is_refused(tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=16))
    for params in (
        SamplingParams(pooling="max"),
        SamplingParams(pooling="mean", n=2),
        SamplingParams(pooling="last", logprobs=1),
    ):
        with pytest.raises(ValueError):
            engine.add_request("x", [0, 1, 2], params)
    assert not engine.has_unfinished_requests()
