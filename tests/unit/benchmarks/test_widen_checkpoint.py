"""The zero-widened checkpoint of spec_decode_bench computes its source model's function:
same logits through Hugging Face transformers, same greedy tokens through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.widen_checkpoint import widen_checkpoint
from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def wide(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = json.loads((tiny_llama / "config.json").read_text())
    hidden, inter = 3 * config["hidden_size"], 4 * config["intermediate_size"]
    return widen_checkpoint(tiny_llama, tmp_path_factory.mktemp("wide"), hidden, inter)


def test_the_widened_model_gives_the_same_logits(tiny_llama: Path, wide: Path) -> None:
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    big = AutoModelForCausalLM.from_pretrained(wide, torch_dtype=torch.float32).eval()
    assert big.config.hidden_size == 3 * small.config.hidden_size
    assert big.num_parameters() > 5 * small.num_parameters()
    ids = torch.randint(
        0, small.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = small(ids).logits, big(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_engine_decodes_the_same_tokens_from_it(tiny_llama: Path, wide: Path) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 14, 3, 7], [11, 2, 8]]
    kw = dict(num_kv_blocks=64, block_size=16, max_model_len=128)
    small = [o.outputs[0].token_ids for o in LLM(str(tiny_llama), **kw).generate(prompts, params)]
    big = [o.outputs[0].token_ids for o in LLM(str(wide), **kw).generate(prompts, params)]
    assert big == small and all(len(t) == 24 for t in small)


def test_widening_refuses_to_shrink(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sizes >= the model's"):
        widen_checkpoint(tiny_llama, tmp_path / "w", 8, 8)
