"""Tiny random Hugging Face checkpoints the tests build themselves (no model hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from engine_worker.demo.checkpoint import train_bpe_tokenizer

SPECIAL_TOKENS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TEXT = """The quick brown fox jumps over the lazy dog near the river bank.
A paged key value cache stores attention keys in fixed size blocks.
Continuous batching lets new requests join a running batch between steps.
Olá! Ça va? Grüße aus Köln — 東京は晴れです。 Emoji: 🚀✨ and numbers 12345 67.89.
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
The scheduler admits a sequence only when enough blocks are free for its prompt.
Workers pull jobs from the queue while they have room, and the backlog waits.
Streaming sends token deltas back to the client as server sent events.
"""


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """The demo builder's BPE trainer on a few lines of mixed-script text (byte fallback paths)."""
    return train_bpe_tokenizer(_TEXT.splitlines() * 4, vocab_size, SPECIAL_TOKENS, bos_token="<s>")


def _config(arch: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.2,
    )
    if arch == "llama":
        common.update(rope_theta=10000.0, tie_word_embeddings=False)
        common.update(overrides)
        return LlamaConfig(**common)
    if arch == "mistral":
        common.update(rope_theta=10000.0, tie_word_embeddings=False, sliding_window=None)
        common.update(overrides)
        return MistralConfig(**common)
    if arch == "qwen2":
        common.update(rope_theta=1000000.0, tie_word_embeddings=True)
        common.update(overrides)
        return Qwen2Config(**common)
    if arch == "qwen3":
        common.update(rope_theta=1000000.0, tie_word_embeddings=False, head_dim=32)
        common.update(overrides)
        return Qwen3Config(**common)
    raise ValueError(arch)


def build_tiny_checkpoint(
    path: Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str = "5GB",
    **overrides,
) -> Path:
    """Random weights saved with save_pretrained, plus a locally trained BPE tokenizer."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = _config(arch, vocab, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": cfg.max_position_embeddings,
            }
        )
    )
    return path
