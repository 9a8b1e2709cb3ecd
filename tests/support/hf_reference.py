"""Hugging Face transformers as the reference the engine's tokens are compared with."""

from __future__ import annotations

import inspect
from functools import cache

import torch


@cache
def hf_model(path: str) -> torch.nn.Module:
    """A checkpoint in fp32 on the CPU, loaded once per test session."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward's KV-cache argument: `cache` from transformers 5.25 on (its output field
    too), `past_key_values` before it (deprecated there, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@cache
def hf_greedy(path: str, prompt: tuple[int, ...], max_new: int) -> list[int]:
    """HF's own forward with its KV cache, greedy, never stopping at EOS (like ignore_eos).

    Not `generate(min_new_tokens=...)`: that masks EOS out of the logits instead.
    """
    model = hf_model(path)
    name = _cache_argument(model)
    ids = torch.tensor([prompt])
    out: list[int] = []
    kv = None
    with torch.no_grad():
        for _ in range(max_new):
            res = model(ids, use_cache=True, **{name: kv})
            kv = getattr(res, name)
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out
