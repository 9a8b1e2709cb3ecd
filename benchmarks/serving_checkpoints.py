"""Random Llama checkpoints with the demo model's tokenizer, for serving benchmarks.

The demo model's forward is so small that the stack's per-token cost dominates; a
serving benchmark also wants a model whose forward costs what a real CPU model's does.
These are built here from a fixed seed (no model hub), so every run measures the same
weights: `python benchmarks/serving_bench.py --model-preset llama50m`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PRESETS: dict[str, dict[str, int]] = {
    # ~52M parameters: 8 layers of 768, GQA 12/4, MLP 2048 (the size serving_50m.json uses)
    "llama50m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
}


def build_preset(name: str, demo_dir: Path, out: Path) -> Path:
    """`out` holds preset `name` (built once, then reused) with `demo_dir`'s tokenizer."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from random_llama import save_random_llama  # a sibling script, as serving_bench imports us
    from transformers import LlamaConfig

    from engine_worker.demo.checkpoint import ensure_demo_checkpoint

    demo_dir = ensure_demo_checkpoint(demo_dir)
    demo = LlamaConfig.from_pretrained(demo_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_random_llama(
        tmp,
        PRESETS[name],
        demo.max_position_embeddings,
        vocab_size=demo.vocab_size,
        bos_token_id=demo.bos_token_id,
        eos_token_id=demo.eos_token_id,
    )
    for f in TOKENIZER_FILES:
        if (demo_dir / f).is_file():
            shutil.copy(demo_dir / f, tmp / f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # complete or absent: an interrupted build is redone
    return out
