"""Runs one scheduled batch through the model: inputs built on the host once per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_worker.engine.attention.backend import AttentionBackend
from engine_worker.engine.attention.metadata import AttentionMetadata
from engine_worker.engine.config import ModelConfig
from engine_worker.engine.cuda_graphs import DecodeGraphs
from engine_worker.engine.host_tensors import to_device
from engine_worker.engine.models.llama import LlamaForCausalLM
from engine_worker.engine.parallel.group import TensorParallel
from engine_worker.engine.parallel.step_sync import receive_step, send_step, send_stop
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One [2, blocks, block_size, kv_heads, head_dim] tensor, viewed per layer as (K, V)."""
    shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    return [(cache[i, 0], cache[i, 1]) for i in range(cfg.num_layers)]


@dataclass
class PooledRows:
    """One step's hidden states of an embedding sequence: their sum and the last one."""

    total: torch.Tensor
    last: torch.Tensor


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the sequences that sample this step
    # Async scheduling: (input row, sequence) of each input token the previous step is
    # still sampling on the device; `ModelRunner` fills those rows from its tokens.
    on_device: list[tuple[int, Sequence]]


@dataclass
class DeviceTokens:
    """The tokens a launched step sampled, still on the device, and the row of each
    sampling sequence: where the next step's inputs take the tokens the host lacks."""

    tokens: torch.Tensor
    row_of: dict[int, int]  # seq_id -> row


def prepare_inputs(
    items: list[tuple[Sequence, int]],
    sample_mask: list[bool],
    block_size: int,
    device: torch.device,
) -> StepInputs:
    """Flatten (sequence, new tokens) pairs; the items must list decodes first.

    A sequence with speculative tokens computes them after its last token, and when it
    samples it gets a logits row for each of them too (1 + proposals rows, in order).
    Under async scheduling a sequence's last token may not be on the host yet: its input
    row is listed in `on_device` and holds 0 until the runner fills it.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    query_lens: list[int] = []
    logits_indices: list[int] = []
    num_decodes = 0
    on_device: list[tuple[int, Sequence]] = []
    for (seq, n), samples in zip(items, sample_mask, strict=True):
        start = seq.num_computed_tokens
        end = start + n
        spec = seq.spec_token_ids
        known = (seq.token_ids + spec if spec else seq.token_ids)[start:end]
        if len(known) < n:  # the one token still being sampled (speculation is off then)
            assert len(known) == n - 1, "at most one token of a sequence is in flight"
            on_device.append((len(input_ids) + len(known), seq))
            known.append(0)
        input_ids.extend(known)
        positions.extend(range(start, end))
        table = seq.block_table
        slots.extend(
            table[p // block_size] * block_size + p % block_size for p in range(start, end)
        )
        query_start.append(query_start[-1] + n)
        seq_lens.append(end)
        query_lens.append(n)
        if n == 1 and num_decodes == len(query_lens) - 1:
            num_decodes += 1
        if samples:
            logits_indices.extend(range(query_start[-1] - 1 - len(spec), query_start[-1]))
    max_blocks = max(len(seq.block_table) for seq, _ in items)
    tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq, _ in items]

    def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(data, device, dtype)

    meta = AttentionMetadata(
        query_start_loc=tensor(query_start, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        block_tables=tensor(tables, torch.int32),
        slot_mapping=tensor(slots, torch.int64),
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return StepInputs(
        input_ids=tensor(input_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        meta=meta,
        logits_indices=tensor(logits_indices, torch.int64),
        on_device=on_device,
    )


class ModelRunner:
    """Owns the model, its KV cache and the attention backend.

    Under tensor parallelism (`parallel` given) rank 0's runner broadcasts each step's
    inputs before its forward pass, and every other rank's runner sits in `follow`,
    running the same forward on its shard: the collectives inside line up step by step.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        parallel: TensorParallel | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.parallel = parallel if parallel is not None and parallel.size > 1 else None
        self.decode_graphs: DecodeGraphs | None = None

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Capture decode graphs (CUDA only); the backend must have step-independent grids."""
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.backend,
            max_batch=max_batch,
            max_blocks_per_seq=(max_model_len + self.block_size - 1) // self.block_size,
            max_seq_len=max_model_len,
            device=self.device,
        )
        graphs.capture()
        self.decode_graphs = graphs

    def _hidden(
        self,
        items: list[tuple[Sequence, int]],
        sample_mask: list[bool],
        previous: DeviceTokens | None = None,
    ) -> tuple[torch.Tensor, StepInputs]:
        inputs = prepare_inputs(items, sample_mask, self.block_size, self.device)
        if inputs.on_device:
            if previous is None:
                raise RuntimeError("a step's input token is on the device, but no step sampled it")
            rows = [previous.row_of[seq.seq_id] for _, seq in inputs.on_device]
            where = to_device([i for i, _ in inputs.on_device], self.device, torch.int64)
            from_rows = to_device(rows, self.device, torch.int64)
            inputs.input_ids[where] = previous.tokens[from_rows]
            inputs.on_device = []  # consumed; tensor-parallel ranks get the filled ids
        if self.parallel is not None:
            send_step(self.parallel, inputs)
        if self.decode_graphs is not None and self.decode_graphs.fits(inputs.meta):
            hidden = self.decode_graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            hidden = self.model(
                inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend
            )
        return hidden, inputs

    @torch.inference_mode()
    def execute(
        self,
        items: list[tuple[Sequence, int]],
        sample_mask: list[bool],
        previous: DeviceTokens | None = None,
    ) -> torch.Tensor:
        """Logits [rows, vocab] in fp32: a row per sampling sequence, plus one per
        speculative token of those that speculate. `previous`: the tokens the step
        before sampled, for inputs the host does not have yet (async scheduling)."""
        hidden, inputs = self._hidden(items, sample_mask, previous)
        return self.model.compute_logits(hidden[inputs.logits_indices])

    @torch.inference_mode()
    def execute_pooling(
        self, items: list[tuple[Sequence, int]], sample_mask: list[bool], pool_mask: list[bool]
    ) -> tuple[torch.Tensor, list[PooledRows | None]]:
        """Logits as `execute`, plus, per item of an embedding sequence, its rows' fp32 sum
        and last row (final-norm hidden states), for the engine to pool across chunks."""
        hidden, inputs = self._hidden(items, sample_mask)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        pooled: list[PooledRows | None] = []
        start = 0
        for (_, n), pool in zip(items, pool_mask, strict=True):
            if pool:
                rows = hidden[start : start + n].float()
                pooled.append(PooledRows(rows.sum(dim=0), rows[-1].clone()))
            else:
                pooled.append(None)
            start += n
        return logits, pooled

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks other than 0: run each step rank 0 sends, until it sends the stop."""
        assert self.parallel is not None and not self.parallel.is_leader
        while (inputs := receive_step(self.parallel)) is not None:
            self.model(
                inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend
            )

    def stop_followers(self) -> None:
        """Rank 0: release the other ranks from `follow`."""
        if self.parallel is not None:
            send_stop(self.parallel)


@torch.inference_mode()
def profile_step(
    model: LlamaForCausalLM,
    cfg: ModelConfig,
    backend: AttentionBackend,
    block_size: int,
    num_tokens: int,
    num_samples: int,
    kv_dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Run the largest step once (a prefill of `num_tokens` dummy tokens, then logits and a
    sort for `num_samples` rows, as the sampler does) so its activation peak can be
    measured; returns the bytes of the small probe KV cache it used, not to be counted."""
    hidden, kv = prefill_alone(model, cfg, backend, [0] * num_tokens, block_size, kv_dtype, device)
    logits = model.compute_logits(hidden[-1:].expand(num_samples, -1).contiguous())
    torch.sort(torch.softmax(logits, dim=-1), dim=-1)
    num_blocks = kv[0][0].shape[0]  # the probe cache is held until here, past the peak
    return num_blocks * kv_bytes_per_block(cfg, block_size, kv_dtype)


def prefill_alone(
    model: LlamaForCausalLM,
    cfg: ModelConfig,
    backend: AttentionBackend,
    token_ids: list[int],
    block_size: int,
    kv_dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One sequence's whole prefill through the engine's paged forward, in a cache of its
    own (blocks in order): its hidden states and that cache. The memory probe above, and
    benchmarks that read teacher-forced logits as the engine computes them."""
    num_blocks = -(-len(token_ids) // block_size)
    kv = allocate_kv_cache(cfg, num_blocks, block_size, kv_dtype, device)
    seq = Sequence(
        seq_id=-1,
        request_id="prefill-alone",
        index=0,
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids),
        params=SamplingParams(),
        priority=0,
        arrival=0,
        block_table=list(range(num_blocks)),
    )
    inputs = prepare_inputs([(seq, len(token_ids))], [True], block_size, device)
    return model(inputs.input_ids, inputs.positions, kv, inputs.meta, backend), kv
