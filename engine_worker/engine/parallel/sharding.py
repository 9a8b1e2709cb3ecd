"""How a Llama-family model splits across tensor-parallel ranks (Megatron-style).

Column-parallel (output rows split; no communication): the fused q/k/v projection, by
whole heads, and the fused gate/up projection. Row-parallel (input columns split, each
rank's partial output summed by an all-reduce): o_proj and down_proj. So a decoder layer
costs two all-reduces of [tokens, hidden]. Attention heads and the KV cache follow the
q/k/v split: each rank holds num_kv_heads / N heads of every layer's cache.

The embedding and lm_head are replicated, not vocab-parallel: the embedding lookup is a
gather (no FLOPs to split) and only rank 0 samples, so only rank 0 runs lm_head and no
logits cross ranks; a vocab-parallel lm_head would split its FLOPs at the price of a
gather of [batch, vocab / N] logits every step, worth it for large vocabularies on GPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from engine_worker.engine.config import ModelConfig
from engine_worker.engine.parallel.group import TensorParallel

# Checkpoint tensors (HF name suffixes) cut along dim 1: the row-parallel Linears.
ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
# The projections (models/linear.py Linears, or their quantized stand-ins) each rank
# holds a 1/N slice of; everything else is replicated.
SHARDED_MODULES = ("attn.qkv", "attn.o_proj", "mlp.gate_up", "mlp.down")
# Of those, the ones holding a slice of every row (the row-parallel ones).
ROW_PARALLEL_MODULES = ("attn.o_proj", "mlp.down")


def whole_row_amax(
    tp: TensorParallel | None,
) -> Callable[[str], Callable[[torch.Tensor], torch.Tensor] | None]:
    """For weight quantization: per module name, what turns a rank's row maxima into the
    whole row's (a max over the ranks) for the row-parallel Linears, None for the others
    (a column-parallel rank holds whole rows; a replicated Linear is whole)."""

    def for_module(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if tp is None or tp.size == 1 or not name.endswith(ROW_PARALLEL_MODULES):
            return None
        return tp.max_over_ranks_

    return for_module


def shard_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The architecture one rank of `size` builds: 1/size of the heads and of the MLP."""
    if size == 1:
        return cfg
    for what, n in (
        ("attention heads", cfg.num_heads),
        ("key/value heads", cfg.num_kv_heads),
        ("intermediate size", cfg.intermediate_size),
    ):
        if n % size:
            raise ValueError(
                f"--tensor-parallel-size {size} does not divide the model's {what} ({n})"
            )
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // size,
        num_kv_heads=cfg.num_kv_heads // size,
        intermediate_size=cfg.intermediate_size // size,
    )
