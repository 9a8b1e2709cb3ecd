"""CUDA graphs for decode-only steps: one captured graph per padded batch size.

A decode step of a small model is dominated by kernel-launch overhead; replaying a
captured graph removes it. Inputs are copied into static buffers, the batch is padded
to the next captured size (padding rows write to slot -1, which the KV write skips),
and the attention launch grid is made independent of the step by a fixed maximum
context length (see TritonAttentionBackend).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from engine_worker.engine.attention.backend import AttentionBackend
from engine_worker.engine.attention.metadata import AttentionMetadata
from engine_worker.engine.models.llama import LlamaForCausalLM

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the graph's output buffer [batch, hidden]


class DecodeGraphs:
    """Captures decode steps at start-up; `run` replays the smallest graph that fits."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend,
        max_batch: int,
        max_blocks_per_seq: int,
        max_seq_len: int,
        device: torch.device,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.max_seq_len = max_seq_len
        sizes = sorted({b for b in batch_sizes if b <= max_batch} | {max_batch})
        self.batch_sizes = sizes
        n = sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, _Captured] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            num_decodes=b,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[self.max_seq_len] * b,
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b), self.backend
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so smaller graphs reuse the same memory pool."""
        for b in reversed(self.batch_sizes):
            self._forward(b)  # warm up: compile Triton kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self._forward(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = _Captured(graph, hidden)
        torch.cuda.synchronize()

    def fits(self, meta: AttentionMetadata) -> bool:
        return (
            bool(self.graphs)
            and meta.num_decodes == meta.num_seqs
            and meta.num_seqs <= self.batch_sizes[-1]
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n = meta.num_seqs
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:b].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.block_tables[:n, width:].zero_()
        self.block_tables[n:b].zero_()
        captured = self.graphs[b]
        captured.graph.replay()
        return captured.hidden[:n]
