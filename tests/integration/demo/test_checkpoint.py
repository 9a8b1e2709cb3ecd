"""The demo checkpoint builder: a real HF folder, trained offline, reproducible from its seed.

Builds use a few tiny training steps; the full default build is checked by hand (see the
builder's docstring), not here, to keep the suite fast.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_worker.demo.checkpoint import (
    BUILD_INFO_FILE,
    CHECKPOINT_FILES,
    TrainingPlan,
    build_demo_checkpoint,
    ensure_demo_checkpoint,
    is_complete_checkpoint,
)
from engine_worker.demo.corpus import (
    BOS_TOKEN,
    EOS_TOKEN,
    demo_corpus,
    render_chat,
)
from engine_worker.engine.config import load_model_config
from engine_worker.engine.models.loader import build_model, load_weights
from shared.tokenizer import load_tokenizer

TEST_PLAN = TrainingPlan(steps=30, batch_size=4, seq_len=128, warmup_steps=5)


def _build(path: Path, seed: int = 0) -> Path:
    return build_demo_checkpoint(path, seed=seed, steps=TEST_PLAN.steps, plan=TEST_PLAN)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("demo") / "jetserve-demo")


def test_folder_is_a_complete_llama_checkpoint(demo_dir: Path) -> None:
    import json

    assert is_complete_checkpoint(demo_dir)
    assert (demo_dir / BUILD_INFO_FILE).is_file()
    assert not list(demo_dir.parent.glob(".*building*"))  # staging folder cleaned up
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["tie_word_embeddings"] is False
    bundle = load_tokenizer(demo_dir)
    assert cfg["vocab_size"] == bundle.vocab_size
    assert bundle.eos_token_ids == {bundle.tokenizer.token_to_id(EOS_TOKEN)}
    weights = load_file(str(demo_dir / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert weights["lm_head.weight"].dtype == torch.float32


def test_transformers_loads_the_same_model_and_it_learned(demo_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(demo_dir)
    bundle = load_tokenizer(demo_dir)
    text = "The fox lives in the forest."
    assert hf_tok(text).input_ids == bundle.encode(text)
    assert hf_tok.bos_token == BOS_TOKEN and hf_tok.eos_token == EOS_TOKEN

    hf = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    # The engine's model (the one the builder trained) read back from the written files.
    cfg = load_model_config(demo_dir)
    ours = build_model(cfg, torch.float32, torch.device("cpu"), cfg.max_position_embeddings)
    load_weights(ours, demo_dir)
    ids = torch.tensor([bundle.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.forward_causal(ids), rtol=1e-4, atol=1e-4)

    # held-out documents (another seed): far better than a uniform guess over the vocabulary
    held_out = [bundle.encode(d, add_special_tokens=False) for d in demo_corpus(12345, 16)]
    with torch.no_grad():
        losses = [hf(torch.tensor([d]), labels=torch.tensor([d])).loss.item() for d in held_out]
    mean = sum(losses) / len(losses)
    assert mean < math.log(bundle.vocab_size) - 2.0, (mean, math.log(bundle.vocab_size))


def test_chat_template_renders_the_same_everywhere(demo_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(demo_dir)
    bundle = load_tokenizer(demo_dir)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What does a cat eat?"},
        {"role": "assistant", "content": "A cat eats fish and chicken."},
        {"role": "user", "content": "Where does a cat live?"},
    ]
    ours = bundle.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == (
        "<s><|system|>You are a helpful assistant.<|end|><|user|>What does a cat eat?<|end|>"
        "<|assistant|>A cat eats fish and chicken.</s><|user|>Where does a cat live?<|end|>"
        "<|assistant|>"
    )
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours
    assert render_chat(messages, add_generation_prompt=True) == ours
    ids = bundle.encode_chat(messages)
    assert ids.count(bundle.tokenizer.token_to_id(BOS_TOKEN)) == 1
    assert ids[-1] == bundle.tokenizer.token_to_id("<|assistant|>")
    with pytest.raises(Exception, match="roles must be"):
        bundle.apply_chat_template([{"role": "tool", "content": "x"}])


def test_same_seed_gives_identical_files_and_another_seed_does_not(
    demo_dir: Path, tmp_path: Path
) -> None:
    again = _build(tmp_path / "again", seed=0)
    for name in (*CHECKPOINT_FILES, BUILD_INFO_FILE):
        assert _sha(again / name) == _sha(demo_dir / name), name
    other = _build(tmp_path / "other", seed=1)
    assert _sha(other / "model.safetensors") != _sha(demo_dir / "model.safetensors")


def test_ensure_and_cli_skip_a_complete_checkpoint_and_rebuild_otherwise(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from services.cli import main

    before = _sha(demo_dir / "model.safetensors")
    assert ensure_demo_checkpoint(demo_dir) == demo_dir  # would take minutes if it rebuilt
    assert main(["build-demo", "--out", str(demo_dir)]) == 0
    assert "already built" in capsys.readouterr().err
    assert _sha(demo_dir / "model.safetensors") == before

    target = tmp_path / "from-env"
    monkeypatch.setenv("JETSERVE_DEMO_MODEL_DIR", str(target))
    target.mkdir()
    (target / "config.json").write_text("{}")  # a half-written folder is not a checkpoint
    assert main(["build-demo", "--steps", "2", "--seed", "3"]) == 0
    assert is_complete_checkpoint(target)
    rebuilt = _sha(target / "model.safetensors")
    assert main(["build-demo", "--steps", "3", "--seed", "3", "--force"]) == 0
    assert _sha(target / "model.safetensors") != rebuilt

    (target / "tokenizer.json").unlink()
    ensure_demo_checkpoint(target, steps=2, seed=3)
    assert _sha(target / "model.safetensors") == rebuilt


def test_engine_greedy_generation_matches_transformers(demo_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from engine_worker.engine.llm import LLM
    from shared.sampling_params import SamplingParams

    bundle = load_tokenizer(demo_dir)
    prompts = [
        bundle.encode("Once upon a time"),
        bundle.encode_chat([{"role": "user", "content": "What does a fox eat?"}]),
    ]
    llm = LLM(str(demo_dir), dtype="float32", device="cpu")
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    hf = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    eos = bundle.tokenizer.token_to_id(EOS_TOKEN)
    for prompt, result in zip(prompts, results, strict=True):
        out = result.outputs[0]
        assert out.token_ids, "no tokens generated"
        assert out.finish_reason in ("stop", "length")
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ref
        assert out.text == bundle.decode(out.token_ids)
