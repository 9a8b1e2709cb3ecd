"""Build the model and fill it from a Hugging Face folder's safetensors (or random weights)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine_worker.engine.config import ModelConfig
from engine_worker.engine.models.layers import LayerOps
from engine_worker.engine.models.llama import LlamaForCausalLM
from engine_worker.engine.parallel.group import TensorParallel
from engine_worker.engine.parallel.sharding import ROW_PARALLEL

# HF name -> (our parameter, which slice of a fused weight)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "self_attn.q_proj.weight": ("attn.qkv.weight", "q"),
    "self_attn.k_proj.weight": ("attn.qkv.weight", "k"),
    "self_attn.v_proj.weight": ("attn.qkv.weight", "v"),
    "self_attn.q_proj.bias": ("attn.qkv.bias", "q"),
    "self_attn.k_proj.bias": ("attn.qkv.bias", "k"),
    "self_attn.v_proj.bias": ("attn.qkv.bias", "v"),
    "self_attn.o_proj.weight": ("attn.o_proj.weight", None),
    "self_attn.q_norm.weight": ("attn.q_norm.weight", None),
    "self_attn.k_norm.weight": ("attn.k_norm.weight", None),
    "mlp.gate_proj.weight": ("mlp.gate_up.weight", "gate"),
    "mlp.up_proj.weight": ("mlp.gate_up.weight", "up"),
    "mlp.down_proj.weight": ("mlp.down.weight", None),
    "input_layernorm.weight": ("input_norm.weight", None),
    "post_attention_layernorm.weight": ("post_attn_norm.weight", None),
}
_TOP_MAP = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _slice(cfg: ModelConfig, part: str | None) -> slice | None:
    q, kv, inter = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    return {
        None: None,
        "q": slice(0, q),
        "k": slice(q, q + kv),
        "v": slice(q + kv, q + 2 * kv),
        "gate": slice(0, inter),
        "up": slice(inter, 2 * inter),
    }[part]


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model folder {str(model_dir)!r} has no .safetensors weights")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"model folder {str(model_dir)!r} is missing shards {missing}")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
            tensors = load_file(path)
        except Exception as e:  # safetensors raises several types for a damaged file
            raise ValueError(f"corrupt safetensors file {path.name}: {e}") from e
        for name in names:
            yield name, tensors[name]


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    ops: LayerOps | None = None,
    tp: TensorParallel | None = None,
) -> LlamaForCausalLM:
    """`tp` given: `cfg` is this rank's share and the model sums its row-parallel outputs."""
    with torch.device(device), _default_dtype(dtype):
        return LlamaForCausalLM(cfg, max_positions, ops, tp).eval()


def _rank_shard(
    tensor: torch.Tensor, hf_suffix: str | None, part: str | None, tp: TensorParallel | None
) -> torch.Tensor:
    """This rank's piece of a checkpoint tensor: rows of a column-parallel weight (q/k/v by
    whole heads, gate, up, and their biases), columns of a row-parallel one, or all of a
    replicated one (norms, embedding, lm_head)."""
    if tp is None or tp.size == 1:
        return tensor
    if part is not None:
        return tp.shard(tensor, 0)
    if hf_suffix in ROW_PARALLEL:
        return tp.shard(tensor, 1)
    return tensor


def load_weights(model: LlamaForCausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor into place (this rank's share of it under tensor
    parallelism); fail on missing or mismatched ones."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    for name, tensor in _iter_tensors(_checkpoint_files(model_dir)):
        if _IGNORED.search(name):
            continue
        part, hf_suffix = None, None
        if name in _TOP_MAP:
            target = _TOP_MAP[name]
            if target == "lm_head.weight" and model.lm_head is None:
                continue  # tied: some checkpoints still store a copy
        elif m := _LAYER_RE.match(name):
            if m.group(2) not in _LAYER_MAP:
                raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")
            hf_suffix = m.group(2)
            suffix, part = _LAYER_MAP[hf_suffix]
            target = f"layers.{m.group(1)}.{suffix}"
        else:
            raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")
        if target not in params:
            raise ValueError(f"weight {name!r} does not fit a {cfg.architecture} with this config")
        dest = params[target].data
        tensor = _rank_shard(tensor, hf_suffix, part, model.tp)
        sl = _slice(cfg, part)
        view = dest if sl is None else dest[sl]
        if tuple(view.shape) != tuple(tensor.shape):
            raise ValueError(
                f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(view.shape)}"
            )
        view.copy_(tensor)
        filled[target] = filled.get(target, 0) + (1 if sl is None else view.shape[0])
    expected: dict[str, int] = {}
    for n, p in params.items():
        if n.endswith(("qkv.weight", "qkv.bias", "gate_up.weight")):
            expected[n] = p.shape[0]
        else:
            expected[n] = 1
    missing = [n for n in params if filled.get(n) != expected[n]]
    if missing:
        raise ValueError(
            f"checkpoint is missing weights for {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, fused weights split: what
    `load_weights` reads back (the demo builder writes its checkpoint with it)."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for hf_name, target in _TOP_MAP.items():
        if target in params:
            out[hf_name] = params[target].detach()
    for i in range(model.cfg.num_layers):
        for hf_suffix, (suffix, part) in _LAYER_MAP.items():
            target = f"layers.{i}.{suffix}"
            if target in params:
                sl = _slice(model.cfg, part)
                tensor = params[target].detach()
                out[f"model.layers.{i}.{hf_suffix}"] = tensor if sl is None else tensor[sl]
    return {name: t.contiguous().clone() for name, t in out.items()}


def init_random_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Dummy weights for benchmarks of model shapes we have no checkpoint for."""
    gen = torch.Generator(device=model.embed.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
