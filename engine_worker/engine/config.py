"""Engine settings and the model's architecture, read from a Hugging Face folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.settings.engine import EngineSettings
from shared.settings.fields import setting

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where oneDNN runs
    bf16 matmuls on them. torch says so through a private helper; a torch without it
    counts as no AMX (fp32 stays the CPU's dtype)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


@dataclass
class ModelConfig:
    """The architecture facts the model code needs, normalised across the Llama family."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: str
    eos_token_ids: set[int] = field(default_factory=set)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """transformers 5 nests rope settings under rope_parameters; older configs don't."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") not in ("default", None):
        scaling = params
    return float(theta), scaling


def _eos_ids(*values: Any) -> set[int]:
    ids: set[int] = set()
    for v in values:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(int(i) for i in v)
    return ids


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse config.json; raise ValueError naming what is wrong or unsupported."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model folder {str(model_dir)!r} does not exist")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"model folder {str(model_dir)!r} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    if family == "mistral" and cfg.get("sliding_window"):
        # Sliding-window attention is not implemented: cap the context at the window
        # so every attended token is inside it and outputs stay exact.
        cfg["max_position_embeddings"] = min(
            int(cfg.get("max_position_embeddings", 4096)), int(cfg["sliding_window"])
        )
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "qwen2")),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        eos_token_ids=_eos_ids(gen.get("eos_token_id"), cfg.get("eos_token_id")),
    )


class EngineConfig(EngineSettings):
    """How the engine runs a model: the engine settings (declared once, in
    shared/settings/engine.py, with their bounds and defaults) plus the model folder."""

    model: str = setting(help="Hugging Face model folder", env=None)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
        """'auto' keeps the checkpoint's dtype on GPU. On the CPU it computes in fp32 (bf16
        matmuls are slow on most CPUs), except a bf16 checkpoint on a CPU with AMX tiles,
        whose bf16 matmuls beat fp32 (2.75x the engine's tokens/s on issue 16's workload,
        docs/kv-cache.md): there the checkpoint's own dtype is the faster one."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        checkpoint = DTYPES.get(model_cfg.torch_dtype, torch.bfloat16)
        if device.type == "cpu":
            fast_bf16 = checkpoint == torch.bfloat16 and cpu_has_amx()
            return torch.bfloat16 if fast_bf16 else torch.float32
        return checkpoint

    def resolve_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """'auto' is the model's dtype. Another must be the model's or, under an fp32
        model, a 16-bit one: the kernels widen a narrower cache on the load and sum in
        fp32, and a cache wider than the model would only cost bytes."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        kv = DTYPES[self.kv_cache_dtype]
        if kv != model_dtype and model_dtype != torch.float32:
            raise ValueError(
                f"--kv-cache-dtype {self.kv_cache_dtype} under a {str(model_dtype)[6:]} model: "
                "a cache other than the model's dtype needs a float32 model"
            )
        return kv
