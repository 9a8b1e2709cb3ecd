"""The model issue 16 measures on: a random Llama, hidden 512, 8 layers, GQA 8/2 heads,
vocabulary 32000, fp32, saved as a Hugging Face checkpoint (shared by the TP and the
llama.cpp benchmarks so both measure the same weights)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.random_llama import save_random_llama

DIMS = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=32000,
)
QUICK_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)


def make_model(path: Path, quick: bool = False, max_positions: int = 1024) -> dict:
    """Save the random checkpoint under `path`; its dimensions and parameter count."""
    dims = QUICK_DIMS if quick else DIMS
    return save_random_llama(path, dims, max_positions, bos_token_id=1, eos_token_id=2)
