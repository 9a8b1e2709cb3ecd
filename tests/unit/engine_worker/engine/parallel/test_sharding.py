"""Tensor-parallel sharding without processes: two ranks as two threads of this process,
joined over an in-memory store with gloo. Each rank loads its shard of a tiny checkpoint;
together they compute what one rank computes, and the step inputs rank 0 broadcasts
arrive intact."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from engine_worker.engine.config import load_model_config
from engine_worker.engine.model_runner import prepare_inputs
from engine_worker.engine.models.loader import build_model, load_weights
from engine_worker.engine.models.quantization import QuantizedLinear, quantize_model
from engine_worker.engine.parallel.group import TensorParallel
from engine_worker.engine.parallel.sharding import shard_config, whole_row_amax
from engine_worker.engine.parallel.step_sync import receive_step, send_step, send_stop
from engine_worker.engine.sequence import Sequence
from shared.sampling_params import SamplingParams

CPU = torch.device("cpu")


def run_ranks(size: int, body: Callable[[TensorParallel], Any]) -> list[Any]:
    """`body(tp)` on `size` ranks at once (one thread each); their results by rank."""
    store = dist.HashStore()
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            results[r] = body(TensorParallel.join(store, r, size, CPU))
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_shard_config_splits_heads_and_mlp(tiny_llama: Path) -> None:
    cfg = load_model_config(tiny_llama)
    half = shard_config(cfg, 2)
    assert (half.num_heads, half.num_kv_heads, half.intermediate_size) == (
        cfg.num_heads // 2,
        cfg.num_kv_heads // 2,
        cfg.intermediate_size // 2,
    )
    assert (half.hidden_size, half.head_dim, half.vocab_size) == (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.vocab_size,
    )
    assert shard_config(cfg, 1) is cfg
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 does not divide"):
        shard_config(cfg, 3)
    with pytest.raises(ValueError, match="key/value heads"):
        shard_config(cfg, 4)  # 4 query heads, 2 kv heads


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_two_shards_compute_what_one_model_does(fixture: str, request) -> None:
    path: Path = request.getfixturevalue(fixture)
    cfg = load_model_config(path)
    ids = torch.tensor([[3, 17, 29, 41, 5, 77, 12, 9], [8, 8, 100, 2, 61, 33, 7, 250]])
    whole = build_model(cfg, torch.float32, CPU, max_positions=64)
    load_weights(whole, path)
    with torch.inference_mode():
        want = whole.forward_causal(ids)

    def shard(tp: TensorParallel) -> tuple[torch.Tensor, list[torch.Size]]:
        model = build_model(shard_config(cfg, tp.size), torch.float32, CPU, 64, tp=tp)
        load_weights(model, path)
        with torch.inference_mode():
            return model.forward_causal(ids), [p.shape for p in model.parameters()]

    (logits0, shapes0), (logits1, _) = run_ranks(2, shard)
    assert torch.equal(logits0, logits1)  # the all-reduce gives both ranks one result
    torch.testing.assert_close(logits0, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits0.argmax(-1), want.argmax(-1))
    heads = cfg.num_heads * cfg.head_dim
    assert torch.Size([heads // 2 + cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size]) in shapes0
    assert torch.Size([cfg.hidden_size, cfg.intermediate_size // 2]) in shapes0  # down
    assert torch.Size([cfg.vocab_size, cfg.hidden_size]) in shapes0  # replicated embedding


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_shards_are_slices_of_the_quantized_whole(tiny_qwen2: Path, method) -> None:
    """Scales are the whole weight's: each rank's quantized codes and scales are exactly its
    slice of what one rank stores (row-parallel: columns, same scales; column-parallel:
    rows), so the two ranks compute what one quantized model does."""
    cfg = load_model_config(tiny_qwen2)
    ids = torch.tensor([[3, 17, 29, 41, 5, 77, 12, 9]])
    whole = build_model(cfg, torch.float32, CPU, max_positions=64)
    load_weights(whole, tiny_qwen2)
    quantize_model(whole, method)
    want_modules = dict(whole.named_modules())
    with torch.inference_mode():
        want = whole.forward_causal(ids)

    def shard(tp: TensorParallel) -> tuple[torch.Tensor, dict[str, QuantizedLinear]]:
        model = build_model(shard_config(cfg, tp.size), torch.float32, CPU, 64, tp=tp)
        load_weights(model, tiny_qwen2)
        quantize_model(model, method, whole_row_amax(tp))
        with torch.inference_mode():
            logits = model.forward_causal(ids)
        return logits, {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}

    results = run_ranks(2, shard)
    row_parallel = 0
    for rank, (_, modules) in enumerate(results):
        for name, mod in modules.items():
            ref = want_modules[name]
            assert isinstance(ref, QuantizedLinear)
            rows = torch.arange(ref.qweight.shape[0])
            if name.endswith(("o_proj", "down")):
                cols = ref.qweight.shape[1] // 2
                codes = ref.qweight[:, rank * cols : (rank + 1) * cols]
                row_parallel += 1
            else:
                if name.endswith(("qkv", "gate_up")):  # q, k, v (gate, up) split one by one
                    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
                    inter = cfg.intermediate_size
                    parts = [q, kv, kv] if name.endswith("qkv") else [inter, inter]
                    rows = torch.cat([p.chunk(2)[rank] for p in rows.split(parts)])
                codes = ref.qweight[rows]
            assert torch.equal(mod.scales, ref.scales[rows]), name
            assert torch.equal(mod.qweight.view(torch.int8), codes.view(torch.int8)), name
    assert row_parallel == 2 * 2 * cfg.num_layers
    (logits0, _), (logits1, _) = results
    assert torch.equal(logits0, logits1)
    torch.testing.assert_close(logits0, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits0.argmax(-1), want.argmax(-1))


def test_step_inputs_reach_the_other_ranks_intact() -> None:
    seqs = [
        Sequence(
            seq_id=i,
            request_id=str(i),
            index=0,
            token_ids=list(range(5 + 7 * i)),
            num_prompt_tokens=5 + 7 * i,
            params=SamplingParams(),
            priority=0,
            arrival=i,
            block_table=[3 * i, 3 * i + 1, 3 * i + 2][: 1 + i],
        )
        for i in range(3)
    ]
    seqs[0].num_computed_tokens = 4  # a decode, then two prefill chunks
    items = [(seqs[0], 1), (seqs[1], 12), (seqs[2], 6)]
    sent = prepare_inputs(items, [True, True, False], block_size=8, device=CPU)

    def exchange(tp: TensorParallel) -> list[Any]:
        if tp.is_leader:
            send_step(tp, sent)
            send_stop(tp)
            return []
        return [receive_step(tp), receive_step(tp)]

    _, (got, stop) = run_ranks(2, exchange)
    assert stop is None
    assert type(got) is type(sent) and type(got.meta) is type(sent.meta)
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(got, name), getattr(sent, name))
        assert getattr(got, name).dtype == getattr(sent, name).dtype
    for name, value in vars(sent.meta).items():
        other = getattr(got.meta, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(other, value) and other.dtype == value.dtype, name
        else:
            assert other == value, name
