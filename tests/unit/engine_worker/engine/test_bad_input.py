"""Bad input raises a clear error and the engine keeps serving other requests."""

from __future__ import annotations

import json
import shutil

import pytest

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm import LLM
from engine_worker.engine.llm_engine import LLMEngine
from shared.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama), block_size=4, num_kv_blocks=64))


def _run_ok(engine: LLMEngine) -> list[int]:
    engine.add_request(
        "good", [0, 5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    )
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "good" and out.deltas:
                tokens += out.deltas[0].token_ids
    return tokens


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([0] * 300, SamplingParams(), "at most 255"),
        ([0, 1], SamplingParams(max_tokens=0), "max_tokens"),
        ([0, 99999], SamplingParams(), "token ids"),
        ([0, 1], SamplingParams(temperature=-1), "temperature"),
        ([0, 1], SamplingParams(top_p=0), "top_p"),
    ],
)
def test_bad_requests_rejected_engine_keeps_serving(engine, prompt, params, message):
    engine.add_request("busy", [0, 7, 8], SamplingParams(max_tokens=2, ignore_eos=True))
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert "bad" not in engine.requests
    assert len(_run_ok(engine)) == 3
    assert engine.block_manager.num_free_blocks == 64


def test_unknown_model_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_unsupported_architecture(tmp_path, tiny_llama):
    dst = tmp_path / "weird"
    shutil.copytree(tiny_llama, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"supported: .*LlamaForCausalLM"):
        LLM(str(dst))


def test_corrupt_safetensors(tmp_path, tiny_llama):
    dst = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt safetensors"):
        LLM(str(dst))


def test_missing_weights(tmp_path, tiny_llama):
    dst = tmp_path / "noweights"
    shutil.copytree(tiny_llama, dst)
    (dst / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \.safetensors"):
        LLM(str(dst))


def test_abort_frees_blocks(engine):
    engine.add_request("a", [0, *range(10, 30)], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_blocks < 64
    engine.abort_request("a")
    assert engine.block_manager.num_free_blocks == 64
    outs = engine.step()
    assert outs[0].finished and outs[0].deltas[0].finish_reason == "abort"
