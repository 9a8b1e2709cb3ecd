"""Per-step attention metadata, built once on the host by the model runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes a flattened batch of T new tokens from B sequences.

    Sequences are ordered decodes first (query length 1), then prefill chunks, so a
    backend can take a fast path over ``[:num_decodes]``. Sequence b owns query rows
    ``query_start_loc[b]:query_start_loc[b+1]``; its context after this step is
    ``seq_lens[b]`` tokens, the last ``query_len`` of which are the new ones (causal).
    """

    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks]; unused entries are 0
    slot_mapping: torch.Tensor  # int64 [T]; slot = block_id * block_size + offset
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    # Host copies so reference code never syncs with the device.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
