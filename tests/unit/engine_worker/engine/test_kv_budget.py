"""KV cache sizing: --kv-cache-memory is exact, CPU keeps its default, and a context
length the cache cannot hold is cut with a warning or refused when asked for."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.kv_budget import fit_context, kv_cache_bytes
from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.engine.model_runner import kv_bytes_per_block
from shared.settings import CPU_KV_CACHE_MEMORY

CPU = torch.device("cpu")


def never_profile() -> int:
    raise AssertionError("only CUDA without --kv-cache-memory profiles")


def test_kv_cache_memory_is_exactly_the_bytes_given() -> None:
    config = EngineConfig(model="m", kv_cache_memory="3MiB", gpu_memory_utilization=0.1)
    assert kv_cache_bytes(config, CPU, never_profile) == 3 * 1024 * 1024


def test_cpu_without_a_size_keeps_the_old_default() -> None:
    assert kv_cache_bytes(EngineConfig(model="m"), CPU, never_profile) == CPU_KV_CACHE_MEMORY
    assert CPU_KV_CACHE_MEMORY == 512 * 1024 * 1024


def test_a_context_that_fits_is_kept() -> None:
    assert fit_context(512, False, num_blocks=32, block_size=16) == 512
    assert fit_context(100, True, num_blocks=32, block_size=16) == 100


def test_the_models_limit_is_cut_to_the_cache_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert fit_context(4096, False, num_blocks=10, block_size=16) == 160
    (record,) = caplog.records
    assert "cut from 4096" in record.getMessage() and "holds 160 tokens" in record.getMessage()


def test_an_explicit_max_model_len_that_does_not_fit_fails_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"--max-model-len 4096 does not fit: .* holds 160 tokens"):
        fit_context(4096, True, num_blocks=10, block_size=16)


def test_the_engine_sizes_its_cache_from_the_bytes(tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory="1MiB"))
    per_block = kv_bytes_per_block(engine.model_config, 16, engine.dtype)
    assert engine.stats().num_total_blocks == (1024 * 1024) // per_block
    with pytest.raises(ValueError, match="--max-model-len 512 does not fit"):
        LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=4, max_model_len=512))
