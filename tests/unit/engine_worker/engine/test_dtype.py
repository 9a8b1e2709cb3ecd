"""--dtype auto: the checkpoint's dtype on a GPU; fp32 on a CPU, except a bf16 checkpoint
on a CPU with AMX tiles, where bf16 matmuls are the fast ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_worker.engine import config as config_module
from engine_worker.engine.config import EngineConfig, ModelConfig

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def model_config(torch_dtype: str) -> ModelConfig:
    fields = {f.name: None for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**fields, "torch_dtype": torch_dtype})


@pytest.mark.parametrize(
    ("checkpoint", "amx", "device", "expected"),
    [
        ("bfloat16", True, CPU, torch.bfloat16),
        ("bfloat16", False, CPU, torch.float32),
        ("float16", True, CPU, torch.float32),
        ("float32", True, CPU, torch.float32),
        ("bfloat16", False, GPU, torch.bfloat16),
        ("float16", False, GPU, torch.float16),
    ],
)
def test_auto(monkeypatch, checkpoint, amx, device, expected) -> None:
    monkeypatch.setattr(config_module, "cpu_has_amx", lambda: amx)
    got = EngineConfig(model="m").resolve_dtype(model_config(checkpoint), device)
    assert got == expected


@pytest.mark.parametrize("forced", ["float32", "bfloat16", "float16"])
def test_a_dtype_given_wins_everywhere(monkeypatch, forced) -> None:
    monkeypatch.setattr(config_module, "cpu_has_amx", lambda: True)
    for device in (CPU, GPU):
        got = EngineConfig(model="m", dtype=forced).resolve_dtype(model_config("bfloat16"), device)
        assert got == getattr(torch, forced)


def test_amx_probe_answers_a_bool() -> None:
    assert isinstance(config_module.cpu_has_amx(), bool)
