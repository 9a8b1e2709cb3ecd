"""The GGUF converter (benchmarks/gguf_export.py) checked by llama.cpp itself: the F32
file's greedy tokens equal Hugging Face transformers' on the same checkpoint, and the
F16 and Q8_0 files give logits close to them. Skipped where llama-cpp-python (the
optional `bench` extra, compiled from source) is not installed."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package comes with the optional `bench` extra")
llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is the optional `bench` extra (pip install -e .[bench]; it "
    "compiles llama.cpp from source), not installed here",
)

from benchmarks.gguf_export import permute_for_rope, write_gguf  # noqa: E402
from benchmarks.llamacpp_bench import LlamaCpp  # noqa: E402

PROMPTS = [[0, 5, 6, 7, 8, 9, 10, 11], [0, 40, 41, 42, 43], [2, 3, 200, 17]]
NEW = 12


@pytest.fixture(scope="module")
def hf(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    """Transformers' greedy continuation by full forwards (never stopping at EOS)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def ggufs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf(tiny_llama, out / f"tiny-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}


def prompt_logits(model: LlamaCpp, prompt: list[int]) -> np.ndarray:
    """llama.cpp's logits for the prompt's last position."""
    model.clear()
    model._decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    ptr = llama_cpp.llama_get_logits_ith(model.ctx, -1)
    row = np.ctypeslib.as_array(
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(model.n_vocab,)
    )
    return row.copy()


def test_permutation_pairs_rotary_halves_adjacently() -> None:
    head_dim, heads = 8, 2
    w = torch.arange(heads * head_dim).float().unsqueeze(1)
    got = permute_for_rope(w, heads).squeeze(1).tolist()
    # Per head, HF row j pairs with row j + head_dim/2; llama.cpp wants them adjacent.
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_f32_gguf_decodes_greedy_like_transformers(hf, ggufs) -> None:
    model = LlamaCpp.load(ggufs["f32"], n_seqs=1, seq_len=64)
    for prompt in PROMPTS:
        tokens = model.generate([prompt], NEW)[0][0]
        assert tokens == hf_greedy(hf, prompt, NEW)


def test_batched_sequences_decode_like_single_ones(ggufs) -> None:
    one = LlamaCpp.load(ggufs["f32"], n_seqs=1, seq_len=64)
    many = LlamaCpp.load(ggufs["f32"], n_seqs=len(PROMPTS), seq_len=64)
    together = many.generate(PROMPTS, NEW)[0]
    assert together == [one.generate([p], NEW)[0][0] for p in PROMPTS]


# llama.cpp keeps its KV cache in F16 (its default), so even the F32 file is not bit-exact;
# Q8_0 also quantizes the activations of each matmul to 8 bits. Bounds: the largest logit
# error relative to the largest logit (measured here: 0.0014, 0.0045, 0.042).
@pytest.mark.parametrize(("file_type", "rel_tol"), [("f32", 0.002), ("f16", 0.01), ("q8_0", 0.06)])
def test_logits_match_transformers(hf, ggufs, file_type: str, rel_tol: float) -> None:
    model = LlamaCpp.load(ggufs[file_type], n_seqs=1, seq_len=64)
    for prompt in PROMPTS:
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        got = prompt_logits(model, prompt)
        assert np.abs(got - want).max() <= rel_tol * np.abs(want).max()
        assert got.argmax() == want.argmax()
