"""Write a Llama checkpoint (Hugging Face folder, safetensors) as a GGUF file for
llama.cpp, with the `gguf` package: F32, F16 or Q8_0 weights.

What llama.cpp's Llama layout wants, done here rather than with llama.cpp's own script:
- tensor names: token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,
  ffn_gate,ffn_up,ffn_down}, output_norm, output (lm_head; the embedding if tied);
- q and k rows permuted: HF orders each head's rotary pairs as (first half, second
  half) (rotate_half); llama.cpp's Llama rope pairs adjacent rows (0,1), (2,3), ...;
- the tokenizer: a byte-level BPE (tokenizer.json) becomes tokenizer.ggml.model "gpt2"
  with its tokens, merges and token types (added specials are CONTROL); embedding rows
  past the tokenizer's vocabulary get unused placeholder tokens;
- 1-D tensors (norms) stay F32 in every file type, as llama.cpp's converter does.

    python benchmarks/gguf_export.py MODEL_DIR OUT.gguf --type q8_0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

TYPES = ("f32", "f16", "q8_0")


def permute_for_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF rotate_half row order -> llama.cpp's interleaved pairs, per head."""
    rows = w.shape[0]
    return (
        w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _load_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    if not tensors:
        raise ValueError(f"{model_dir} has no .safetensors weights")
    return tensors


def _gguf_tensors(cfg: dict, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    out = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"]),
    }
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(int(cfg["num_hidden_layers"])):
        for hf_name, name in names.items():
            t = hf[f"model.layers.{i}.{hf_name}"]
            if name == "attn_q.weight":
                t = permute_for_rope(t, heads)
            elif name == "attn_k.weight":
                t = permute_for_rope(t, kv_heads)
            out[f"blk.{i}.{name}"] = t
    return out


def _vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) from tokenizer.json's byte-level BPE, padded."""
    import gguf

    tokens = [f"<|unused_{i}|>" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    merges: list[str] = []
    path = model_dir / "tokenizer.json"
    if path.is_file():
        spec = json.loads(path.read_text())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"only BPE tokenizers are converted, not {model.get('type')}")
        for token, idx in model["vocab"].items():
            tokens[idx], types[idx] = token, int(gguf.TokenType.NORMAL)
        for added in spec.get("added_tokens", []):
            kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
            tokens[added["id"]], types[added["id"]] = added["content"], int(kind)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp's BPE needs at least one merge to load
        merges = ["Ġ Ġ"]
    return tokens, types, merges


def write_gguf(model_dir: Path, out: Path, file_type: str = "f32") -> Path:
    """Write `model_dir` (a Llama checkpoint) to `out` as `file_type` (f32, f16, q8_0)."""
    import gguf

    if file_type not in TYPES:
        raise ValueError(f"file type must be one of {TYPES}, not {file_type!r}")
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[file_type]
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[file_type]

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_file_type(int(ftype))

    tokens, types, merges = _vocabulary(model_dir, int(cfg["vocab_size"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(int(value))
    w.add_add_bos_token(False)  # prompts arrive as token ids, BOS included when wanted

    for name, tensor in _gguf_tensors(cfg, _load_checkpoint(model_dir)).items():
        data = tensor.to(torch.float32).numpy()
        if data.ndim == 1:
            w.add_tensor(name, data.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", choices=TYPES, default="f32")
    args = ap.parse_args()
    path = write_gguf(args.model_dir, args.out, args.type)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
