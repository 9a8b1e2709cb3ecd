"""How long one engine step takes on a GPU: a roofline over bytes moved and FLOPs.

A step streams every weight once (whatever the batch), reads the KV cache of every
context token its sequences attend to and writes the KV of its new tokens; it
multiplies each new token through the weights (2 FLOPs per parameter) and attends
each query token to its context. The step lasts as long as the slower of memory and
compute at the profile's efficiencies, plus a fixed per-step overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_worker.engine.simulated.profiles import Profile


@dataclass(frozen=True)
class StepShape:
    """What a scheduled batch asks of the device."""

    num_tokens: int  # new tokens computed (decodes + prefill chunk tokens)
    attended_pairs: int  # sum over sequences of new tokens x context length
    context_tokens: int  # sum over sequences of context length (KV read)


@dataclass(frozen=True)
class StepCost:
    bytes_moved: float
    flops: float
    memory_s: float
    compute_s: float
    seconds: float


def shape_of(items: list[tuple[int, int]]) -> StepShape:
    """(new tokens, context length after them) per scheduled sequence."""
    num_tokens = sum(n for n, _ in items)
    # A query token at position p attends to p+1 tokens; for a chunk ending at `ctx`
    # that is n*ctx - n*(n-1)/2 pairs.
    pairs = sum(n * ctx - n * (n - 1) // 2 for n, ctx in items)
    context = sum(ctx for _, ctx in items)
    return StepShape(num_tokens, pairs, context)


def step_cost(profile: Profile, shape: StepShape) -> StepCost:
    m, gpu = profile.model, profile.gpu
    if shape.num_tokens == 0:
        return StepCost(0.0, 0.0, 0.0, 0.0, 0.0)
    kv = m.kv_bytes_per_token
    bytes_moved = m.weight_bytes_read + kv * shape.context_tokens + kv * shape.num_tokens
    # QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, per head and head dim.
    attention_flops = 4 * m.num_layers * m.num_heads * m.head_dim * shape.attended_pairs
    flops = 2 * m.matmul_params * shape.num_tokens + attention_flops
    memory_s = bytes_moved / (gpu.hbm_bytes_per_s * gpu.memory_efficiency)
    compute_s = flops / (gpu.peak_flops * gpu.compute_efficiency)
    seconds = max(memory_s, compute_s) + gpu.step_overhead_s
    return StepCost(bytes_moved, flops, memory_s, compute_s, seconds)
