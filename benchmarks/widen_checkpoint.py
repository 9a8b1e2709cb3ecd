"""Widen a Llama checkpoint with zero weights: the same function at a larger model's cost.

Speculative decoding pays where a forward pass is bound by weight bytes, as batch-1
decoding of any real model is. The models this repo can train on two cores to copy text
(benchmarks/spec_decode_bench.py) are a few MB: their forward is bound by per-call
overheads and arithmetic instead, so verifying five rows costs far more than one. Padding
such a model with zeros to a real model's width keeps its tokens and gives its forward a
real model's bytes per token:

- the residual stream's new dimensions stay zero: embeddings, o_proj and down_proj write
  nothing into them, and q/k/v, gate/up and the LM head read nothing from them;
- the MLP's new channels are silu(0) * 0 = 0;
- RMSNorm averages over more dimensions, so its weights are scaled by sqrt(h / H) and its
  eps by h / H, which gives the same normalised values up to float rounding.

Attention heads (count and size) are unchanged. Zeros cost what any weights cost: a
matmul's time does not depend on the values it multiplies.

    python benchmarks/widen_checkpoint.py SRC DST --hidden-size 1024 --intermediate-size 4096
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
# Files copied as they are (tokenizer, generation defaults); config.json is rewritten.
COPIED = (
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` in the top-left corner of zeros of `shape`."""
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def widen_tensor(name: str, t: torch.Tensor, h: int, hidden: int, inter: int) -> torch.Tensor:
    """One checkpoint tensor of the widened model (Hugging Face Llama names)."""
    if name.endswith("norm.weight"):  # input, post-attention and final norms
        return pad(t * (h / hidden) ** 0.5, (hidden,))
    # Rows of these are vocab entries or attention features, which keep their count;
    # only the hidden side widens.
    widen_columns = ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj")
    if name.endswith(tuple(f"{part}.weight" for part in widen_columns)):
        return pad(t, (t.shape[0], hidden))
    if name.endswith("o_proj.weight"):
        return pad(t, (hidden, t.shape[1]))
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return pad(t, (inter, hidden))
    if name.endswith("down_proj.weight"):
        return pad(t, (hidden, inter))
    raise ValueError(f"no widening rule for {name} {tuple(t.shape)}")


def widen_checkpoint(src: Path, dst: Path, hidden_size: int, intermediate_size: int) -> Path:
    """Write the widened copy of the Llama checkpoint `src` to `dst`; returns `dst`."""
    config = json.loads((src / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    if hidden_size < h or intermediate_size < i:
        raise ValueError(f"widening needs sizes >= the model's ({h}, {i})")
    if any(config.get(k) for k in ("attention_bias", "mlp_bias", "tie_word_embeddings")):
        raise ValueError("widening handles untied Llama checkpoints without biases")
    config.setdefault("head_dim", h // config["num_attention_heads"])
    tensors = load_file(src / WEIGHTS)
    widened = {
        name: widen_tensor(name, t, h, hidden_size, intermediate_size).contiguous()
        for name, t in tensors.items()
    }
    dst.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    save_file(widened, dst / WEIGHTS, metadata={"format": "pt"})
    config.update(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        rms_norm_eps=config["rms_norm_eps"] * h / hidden_size,
        widened_from={"hidden_size": h, "intermediate_size": i},
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # written last
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--hidden-size", type=int, required=True)
    ap.add_argument("--intermediate-size", type=int, required=True)
    args = ap.parse_args()
    widen_checkpoint(args.src, args.dst, args.hidden_size, args.intermediate_size)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
