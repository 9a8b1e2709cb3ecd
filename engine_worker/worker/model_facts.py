"""What a worker tells the registry about its model: family, size, dtype and a digest.

Ollama clients list models with these (/api/tags, /api/show, /api/ps). The digest is a
sha256 over config.json and the names and sizes of the weight files, so it changes
when the checkpoint does without reading gigabytes of weights at start-up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the worker process of an engine process never loads torch
    from engine_worker.engine.llm_engine import LLMEngine

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class ModelFacts:
    family: str
    num_parameters: int
    dtype: str
    model_bytes: int
    model_digest: str


def checkpoint_digest(model_dir: Path) -> tuple[int, str]:
    """(bytes of the weight files, sha256 hex over config.json and the weight file list)."""
    h = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    total = 0
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            size = path.stat().st_size
            total += size
            h.update(f"{path.name}:{size}\n".encode())
    return total, h.hexdigest()


def model_facts(engine: LLMEngine) -> ModelFacts:
    size, digest = checkpoint_digest(engine.model_dir)
    return ModelFacts(
        family=engine.model_config.family,
        num_parameters=engine.num_parameters,
        dtype=str(engine.dtype).removeprefix("torch."),
        model_bytes=size,
        model_digest=digest,
    )
