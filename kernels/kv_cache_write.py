"""Scatter a step's new keys/values into their paged-cache slots."""

from __future__ import annotations

import torch


def write_kv_cache_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T]; negative slots are skipped (padding)
) -> None:
    num_blocks, block_size, hkv, d = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(
        0, slot_mapping, key.to(k_cache.dtype)
    )
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(
        0, slot_mapping, value.to(v_cache.dtype)
    )
