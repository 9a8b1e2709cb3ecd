"""KV cache sizing: --kv-cache-memory is exact, CPU keeps its default, and a context
length the cache cannot hold is cut with a warning or refused when asked for."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.kv_budget import blocks_in_budget, fit_context, kv_cache_bytes
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


def test_blocks_in_budget_pays_for_every_cache() -> None:
    assert blocks_in_budget(1000, [100]) == 10
    assert blocks_in_budget(1000, [100, 30]) == 7  # 7 x 130 = 910 <= 1000 < 8 x 130
    assert blocks_in_budget(10, [100, 30]) == 1  # never zero: fit_context then cuts


def _cache_bytes(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for layer in kv_caches for t in layer)


def test_a_draft_models_cache_comes_out_of_the_same_budget(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """--kv-cache-memory covers the target's and the draft's caches together: each has
    the engine's block count, and their bytes add up to at most the budget."""
    from tests.support.model_factory import build_tiny_checkpoint

    draft_dir = build_tiny_checkpoint(
        tmp_path / "draft", num_hidden_layers=1, num_key_value_heads=1
    )
    budget = 1024 * 1024
    plain = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=budget))
    spec = LLMEngine(
        EngineConfig(
            model=str(tiny_llama),
            kv_cache_memory=budget,
            speculative_method="draft",
            speculative_model=str(draft_dir),
        )
    )
    draft = spec.proposer
    assert draft is not None and hasattr(draft, "runner")
    target_block = kv_bytes_per_block(spec.model_config, 16, spec.dtype)
    draft_block = kv_bytes_per_block(draft.config, 16, spec.dtype)
    assert 0 < draft_block < target_block  # a smaller model: fewer layers and heads
    blocks = spec.stats().num_total_blocks
    assert blocks == budget // (target_block + draft_block)
    assert blocks < plain.stats().num_total_blocks == budget // target_block
    used = _cache_bytes(spec.runner.kv_caches) + _cache_bytes(draft.runner.kv_caches)
    assert used == blocks * (target_block + draft_block)
    assert budget - (target_block + draft_block) < used <= budget


def test_the_profile_step_runs_the_largest_step(tiny_llama: Path) -> None:
    """The step CUDA sizing measures runs on any device (here the CPU)."""
    from engine_worker.engine.attention.backend import select_backend
    from engine_worker.engine.model_runner import profile_step

    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=8))
    mc = engine.model_config
    probe = profile_step(
        engine.runner.model, mc, select_backend("torch", CPU), 16, 40, 3, engine.dtype, CPU
    )
    assert probe == 3 * kv_bytes_per_block(mc, 16, engine.dtype)  # ceil(40 / 16) blocks


class FakeCuda:
    """torch.cuda's memory counters as numbers: the arithmetic of the sizing rule, on a
    machine without a GPU (the kernels themselves are not involved)."""

    def __init__(self, total: int, free: int, reserved: int, allocated: int, peak: int) -> None:
        self.total, self.free, self.reserved = total, free, reserved
        self.allocated, self.peak = allocated, peak

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "mem_get_info", lambda _d=None: (self.free, self.total))
        monkeypatch.setattr(cuda, "memory_reserved", lambda _d=None: self.reserved)
        monkeypatch.setattr(cuda, "memory_allocated", lambda _d=None: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda _d=None: self.peak)
        for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
            monkeypatch.setattr(cuda, name, lambda *_a: None)


GIB = 1024**3


def test_cuda_gets_utilization_of_total_minus_weights_and_activations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 100 GiB GPU, 16 GiB of weights loaded, a step peaks 4 GiB above them (+1 GiB probe).
    FakeCuda(100 * GIB, 84 * GIB, 16 * GIB, 16 * GIB, 21 * GIB).install(monkeypatch)
    config = EngineConfig(model="m", gpu_memory_utilization=0.5)
    budget = kv_cache_bytes(config, torch.device("cuda"), lambda: 1 * GIB)
    assert budget == 50 * GIB - 16 * GIB - 4 * GIB
    exact = EngineConfig(model="m", kv_cache_memory="8GiB", gpu_memory_utilization=0.5)
    assert kv_cache_bytes(exact, torch.device("cuda"), never_profile) == 8 * GIB


def test_cuda_sizing_fails_with_the_numbers_when_nothing_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeCuda(100 * GIB, 30 * GIB, 16 * GIB, 16 * GIB, 20 * GIB).install(monkeypatch)
    with pytest.raises(ValueError, match=r"asks for 90\.00 GiB of 100\.00 GiB, but only 46\.00"):
        kv_cache_bytes(EngineConfig(model="m"), torch.device("cuda"), lambda: 0)
    FakeCuda(100 * GIB, 84 * GIB, 16 * GIB, 16 * GIB, 21 * GIB).install(monkeypatch)
    with pytest.raises(ValueError, match="leaves no room for a KV cache"):
        low = EngineConfig(model="m", gpu_memory_utilization=0.2)
        kv_cache_bytes(low, torch.device("cuda"), lambda: 0)


def test_the_sizing_page_arithmetic_and_flags() -> None:
    """docs/kv-cache.md: 128 KiB a token for Llama-3.1-8B in bf16, 65,536 tokens in 8 GiB,
    and every flag it names is a `jetserve worker` flag."""
    import re

    from engine_worker.engine.config import ModelConfig
    from services.cli import build_parser

    llama_8b = ModelConfig(
        architecture="LlamaForCausalLM", family="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
        max_position_embeddings=131072, tie_word_embeddings=False, qkv_bias=False,
        qk_norm=False, torch_dtype="bfloat16",
    )  # fmt: skip
    per_block = kv_bytes_per_block(llama_8b, 16, torch.bfloat16)
    assert per_block // 16 == 131072
    assert (8 * 1024**3 // per_block) * 16 == 65536 == 4096 * 16
    page = (Path(__file__).resolve().parents[4] / "docs" / "kv-cache.md").read_text()
    assert "131072" in page and "65,536" in page and "4096 blocks of 16" in page
    parser, _ = build_parser(["worker"])
    worker_help = parser._subparsers._group_actions[0].choices["worker"].format_help()  # type: ignore[union-attr]
    for flag in set(re.findall(r"`(--[a-z-]+)", page)):
        assert flag in worker_help, flag
