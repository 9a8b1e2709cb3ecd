"""A Llama with seeded random fp32 weights saved as a Hugging Face checkpoint: the model
the CPU benchmarks measure on (each picks its own dimensions), with no hub download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_random_llama(path: Path, dims: dict, max_positions: int = 1024, **config: Any) -> dict:
    """Save it under `path`, weights from seed 0 (the same weights on every run); its
    parameter count and `dims`. `config`: further LlamaConfig fields (token ids, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        max_position_embeddings=max_positions, tie_word_embeddings=False, **config, **dims
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    return {"params_millions": round(params / 1e6, 1), **dims}
