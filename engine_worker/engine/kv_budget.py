"""How many bytes the KV cache gets, and what context length that leaves.

The budget pays for every cache a block lives in: the target's, and a draft model's
(speculative decoding) whose cache has as many blocks, indexed by the same block tables.

`--kv-cache-memory` given: exactly that. Not given, on CUDA: vLLM's rule, the
`--gpu-memory-utilization` fraction of the GPU's total memory minus what this process
uses without a KV cache (the weights, plus the activation peak of one full step measured
by running it). Not given, on CPU: `CPU_KV_CACHE_MEMORY`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine_worker.engine.config import EngineConfig
from shared.settings.engine import CPU_KV_CACHE_MEMORY

log = logging.getLogger(__name__)
GIB = 1024**3


def kv_cache_bytes(config: EngineConfig, device: torch.device, profile: Callable[[], int]) -> int:
    """The KV cache budget; `profile` runs the largest step once and returns the bytes of
    the probe cache it allocated (called on CUDA only, when no size is given)."""
    if config.kv_cache_memory is not None:
        return int(config.kv_cache_memory)
    if device.type != "cuda":
        return int(CPU_KV_CACHE_MEMORY)
    return cuda_kv_cache_bytes(device, config.gpu_memory_utilization, profile)


def cuda_kv_cache_bytes(
    device: torch.device, utilization: float, profile: Callable[[], int]
) -> int:
    """utilization x total - (weights + activation peak), measured on this process only, so
    two workers at 0.45 share one GPU."""
    free, total = torch.cuda.mem_get_info(device)
    requested = int(total * utilization)
    ours = torch.cuda.memory_reserved(device)  # the weights, already loaded
    if free + ours < requested:
        raise ValueError(
            f"--gpu-memory-utilization {utilization:g} asks for {requested / GIB:.2f} GiB of "
            f"{total / GIB:.2f} GiB, but only {(free + ours) / GIB:.2f} GiB are free for this "
            "worker (other processes use the rest); lower it or set --kv-cache-memory"
        )
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    probe = profile()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - probe
    torch.cuda.empty_cache()
    non_kv = peak  # the weights (baseline) plus the step's activations on top
    budget = requested - non_kv
    log.info(
        "kv cache sized by --gpu-memory-utilization %.2f: %.2f GiB of %.2f GiB, minus "
        "%.2f GiB weights and %.2f GiB activation peak = %.2f GiB",
        utilization,
        requested / GIB,
        total / GIB,
        baseline / GIB,
        (peak - baseline) / GIB,
        budget / GIB,
    )
    if budget <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {utilization:g} ({requested / GIB:.2f} GiB) leaves no "
            f"room for a KV cache: weights and activations use {non_kv / GIB:.2f} GiB; raise "
            "it or set --kv-cache-memory"
        )
    return budget


def blocks_in_budget(budget: int, bytes_per_block: list[int]) -> int:
    """How many blocks `budget` bytes hold when each block exists once in every cache
    (`bytes_per_block`: one entry per cache, the target's and the draft's): the caches
    together stay within the budget. At least one."""
    return max(budget // sum(bytes_per_block), 1)


def fit_context(limit: int, explicit: bool, num_blocks: int, block_size: int) -> int:
    """The context length a sequence can reach: `limit`, unless one sequence this long does
    not fit the cache (preemption could never make room for it). Then an explicit
    --max-model-len is an error, and the model's own limit is cut with a warning."""
    capacity = num_blocks * block_size
    if capacity >= limit:
        return limit
    facts = f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {block_size})"
    if explicit:
        raise ValueError(
            f"--max-model-len {limit} does not fit: {facts}; give the cache more memory "
            "(--kv-cache-memory, --gpu-memory-utilization) or lower --max-model-len"
        )
    log.warning(
        "context length cut from %d (the model's max_position_embeddings) to %d: %s; give "
        "the cache more memory (--kv-cache-memory, --gpu-memory-utilization) or set "
        "--max-model-len to at most %d",
        limit,
        capacity,
        facts,
        capacity,
    )
    return capacity
