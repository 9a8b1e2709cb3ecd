"""The CPU engine against its limits and against Hugging Face, side by side in one run.

- Batched: 64 prompts of 64 tokens, 64 new tokens each, greedy (issue 16's workload): the
  engine on the C++ CPU kernels, the engine on the torch reference attention, and HF
  static batching (one batch of 64). Warm-up runs use other prompts than the timed ones,
  so no timed run hits the prefix cache (the hit rate is recorded).
- The compute limit, one way: the workload's matmul FLOPs at the matmul peak, the best
  wall-clock GFLOP/s of torch.mm on the workload's own shapes, measured in this process
  with the engine's thread count just before and just after the engine's timed run (their
  mean; both recorded, since the load of a shared box moves it). The engine's share is
  its wall-clock output tokens/s over that limit.
- The same engine with its KV cache in bf16 (--kv-cache-dtype bfloat16; weights and
  compute stay fp32), with its greedy agreement with HF.
- Batch 1: decode tokens/s of one request (64-token prompt, 128 new; median of 3) with
  fp32, int8 and fp8 weights.
- Quality of the quantized weights on the demo model: top-1 agreement with the fp32
  model and perplexity, teacher-forced on held-out demo-corpus text (a seed the demo
  model was never trained on).

    python benchmarks/cpu_engine_bench.py            # writes benchmarks/results/cpu_engine.{json,png}
    python benchmarks/cpu_engine_bench.py --quick    # tiny shapes, seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.box_load import LOAD_NOTE, load_average
from benchmarks.issue16_model import DIMS, QUICK_DIMS
from benchmarks.random_llama import save_random_llama
from engine_worker.engine.config import EngineConfig, cpu_has_amx, load_model_config
from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.engine.models.loader import build_model, load_weights
from engine_worker.engine.models.quantization import quantize_model
from shared.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results"
LLAMA_CPP_F32_ISSUE = 141.0  # tok/s, issue 16's side-by-side measurement on this box


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------- the compute limit


def matmul_shapes(dims: dict, wl: dict) -> list[tuple[int, int, int]]:
    """(M, K, N) of the workload's matmuls: the prefill's projections over all prompt
    tokens, the decode step's MLP and LM head over the batch."""
    h, inter = dims["hidden_size"], dims["intermediate_size"]
    m_big = wl["n"] * wl["prompt_len"]
    return [
        (m_big, h, 3 * h),
        (m_big, h, 2 * inter),
        (m_big, inter, h),
        (wl["n"], h, dims["vocab_size"]),
        (wl["n"], h, 2 * inter),
        (wl["n"], inter, h),
    ]


def matmul_peak_gflops(
    shapes: list[tuple[int, int, int]], repeats: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """Best wall-clock GFLOP/s of torch.mm over the workload's own matmul shapes (M, K, N),
    at the thread count set for the process."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def workload_flops(dims: dict, n: int, prompt_len: int, new_tokens: int) -> float:
    """Matmul FLOPs of the workload as the engine runs it: every prompt and generated
    token through the layers, the LM head only for sampled tokens, attention over the
    causal context."""
    h, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    heads, kv = dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = h // heads
    per_token = (
        2 * layers * (h * (heads + 2 * kv) * head_dim + heads * head_dim * h + 3 * h * inter)
    )
    tokens = prompt_len + new_tokens - 1  # the last sampled token is never fed back
    attention = sum(4 * layers * heads * head_dim * (p + 1) for p in range(tokens))
    lm_head = 2 * h * dims["vocab_size"] * new_tokens
    return n * (tokens * per_token + attention + lm_head)


# ---------------------------------------------------------------- the engine


def engine(path: Path, max_num_seqs: int, **kw) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(path),
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=4096,
            kv_cache_memory=1 << 29,
            **kw,
        )
    )


def run_requests(eng: LLMEngine, batch: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for p in batch:
        eng.add_request(f"r{next_id()}", p, params)
    produced, first_token_at, first_cpu = 0, None, None
    t0, c0 = time.perf_counter(), time.process_time()
    while eng.has_unfinished_requests():
        for out in eng.step():
            produced += sum(len(d.token_ids) for d in out.deltas)
        if first_token_at is None and produced:
            first_token_at, first_cpu = time.perf_counter(), time.process_time()
    end, cpu_end = time.perf_counter(), time.process_time()
    assert produced == len(batch) * new_tokens, produced
    decoded = produced - len(batch)  # tokens after each request's first: the decode steps
    return {
        "seconds": end - t0,
        "cpu_seconds": cpu_end - c0,
        "output_tok_per_s": produced / (end - t0),
        "output_tok_per_cpu_s": produced / (cpu_end - c0),
        "decode_tok_per_s": decoded / (end - first_token_at),
        "decode_tok_per_cpu_s": decoded / (cpu_end - first_cpu),
    }


_ids = iter(range(10**9))


def next_id() -> int:
    return next(_ids)


def batched(path: Path, backend: str, wl: dict, dtype: str = "auto", **kw) -> dict:
    eng = engine(path, wl["n"], attention_backend=backend, dtype=dtype, **kw)
    run_requests(eng, prompts(wl["n"], wl["prompt_len"], wl["vocab"], seed=1000), 4)  # warm-up
    hits_before = eng.block_manager.prefix_hit_rate
    r = run_requests(eng, prompts(wl["n"], wl["prompt_len"], wl["vocab"], seed=0), wl["new"])
    r["prefix_hit_rate_timed"] = eng.block_manager.prefix_hit_rate
    r["prefix_hit_rate_after_warmup"] = hits_before
    r["backend"] = eng.runner.backend.name
    return r


def hf_static(path: Path, wl: dict, dtype: torch.dtype = torch.float32) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    warm = torch.tensor(prompts(wl["n"], wl["prompt_len"], wl["vocab"], seed=1000))
    ids = torch.tensor(prompts(wl["n"], wl["prompt_len"], wl["vocab"], seed=0))
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(warm, max_new_tokens=4, min_new_tokens=4, **kw)
        t, c = time.perf_counter(), time.process_time()
        out = model.generate(ids, max_new_tokens=wl["new"], min_new_tokens=wl["new"], **kw)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    assert out.shape == (wl["n"], wl["prompt_len"] + wl["new"])
    produced = wl["n"] * wl["new"]
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "output_tok_per_s": produced / elapsed,
        "output_tok_per_cpu_s": produced / cpu,
        "tokens": out,
    }


def engine_tokens(path: Path, wl: dict, dtype: str = "auto", **kw) -> list[list[int]]:
    eng = engine(path, wl["n"], dtype=dtype, **kw)
    params = SamplingParams(max_tokens=wl["new"], temperature=0.0, ignore_eos=True)
    batch = prompts(wl["n"], wl["prompt_len"], wl["vocab"], seed=0)
    for i, p in enumerate(batch):
        eng.add_request(str(i), p, params)
    got: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
    return [got[str(i)] for i in range(len(batch))]


def batch_one(
    path: Path, quantization: str, vocab: int, prompt_len: int, new: int, dtype: str = "auto"
) -> dict:
    eng = engine(path, 1, quantization=quantization, dtype=dtype)
    run_requests(eng, prompts(1, prompt_len, vocab, seed=2000), 8)  # warm-up
    runs = [run_requests(eng, prompts(1, prompt_len, vocab, seed=3000 + i), new) for i in range(3)]
    wall = [r["decode_tok_per_s"] for r in runs]
    cpu = [r["decode_tok_per_cpu_s"] for r in runs]
    return {
        "decode_tok_per_s": statistics.median(wall),
        "decode_tok_per_cpu_s": statistics.median(cpu),
        "runs": [round(r, 1) for r in wall],
    }


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict:
    """Greedy agreement of two runs: sequences identical, and the mean share of each
    sequence's tokens before its first difference (one flipped near-tie changes the rest)."""
    prefix = []
    for g, r in zip(got, ref, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), len(r))
        prefix.append(same / len(r))
    return {
        "sequences_identical": round(sum(p == 1.0 for p in prefix) / len(prefix), 3),
        "mean_share_before_first_difference": round(statistics.mean(prefix), 3),
    }


def bf16_arm(path: Path, dims: dict, wl: dict, hf_fp32_tokens: list[list[int]]) -> dict:
    """The engine with bf16 weights, activations and KV cache (what `--dtype auto` picks
    for a bf16 checkpoint on an AMX CPU), against the fp32 engine and HF static batching in
    bf16, with its own limit: the same FLOPs at torch.mm's best bf16 speed."""
    shapes = matmul_shapes(dims, wl)
    peak_before = matmul_peak_gflops(shapes, dtype=torch.bfloat16)
    run = batched(path, "auto", wl, dtype="bfloat16")
    peak = (peak_before + matmul_peak_gflops(shapes, dtype=torch.bfloat16)) / 2
    hf = hf_static(path, wl, torch.bfloat16)
    hf_tokens = hf.pop("tokens")[:, wl["prompt_len"] :].tolist()
    tokens = engine_tokens(path, wl, "bfloat16")
    flops = workload_flops(dims, wl["n"], wl["prompt_len"], wl["new"])
    limit = wl["n"] * wl["new"] / (flops / (peak * 1e9))
    return {
        "cpu_has_amx": cpu_has_amx(),
        "engine": run,
        "hf_static_bf16": hf,
        "matmul_peak_gflops_bf16": round(peak, 1),
        "limit_output_tok_per_s": round(limit, 1),
        "engine_share_of_bf16_limit": round(run["output_tok_per_s"] / limit, 3),
        "engine_vs_hf_static_bf16": round(run["output_tok_per_s"] / hf["output_tok_per_s"], 3),
        "greedy_vs_hf_fp32": agreement(tokens, hf_fp32_tokens),
        "greedy_vs_hf_bf16": agreement(tokens, hf_tokens),
    }


# ---------------------------------------------------------------- quality


def paged_logits(model, cfg, row: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    """Logits of every position of `row` as the engine computes them: one prefill through
    the CPU backend, whose attention reads K/V back from a paged cache of `kv_dtype`."""
    from engine_worker.engine.attention.backend import select_backend
    from engine_worker.engine.model_runner import prefill_alone

    cpu = torch.device("cpu")
    backend = select_backend("auto", cpu)
    hidden, _ = prefill_alone(model, cfg, backend, row, 16, kv_dtype, cpu)
    return model.compute_logits(hidden)


def quality(demo_dir: Path, methods: list[str], docs: int) -> dict:
    """Teacher-forced on held-out demo text: top-1 agreement with fp32, and perplexity.
    `methods`: quantizations, "bf16" (bf16 weights and activations), or "kv_bf16"/
    "kv_fp32" (fp32 weights through the paged forward with a bf16/fp32 KV cache)."""
    from tokenizers import Tokenizer

    from engine_worker.demo.corpus import demo_corpus

    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    cfg = load_model_config(demo_dir)
    texts = demo_corpus(seed=987_654, n=docs)  # the demo model trains on seed 0
    rows = [tok.encode(t).ids[:256] for t in texts]
    rows = [r for r in rows if len(r) > 8]

    def model_for(method: str):
        dtype = torch.bfloat16 if method == "bf16" else torch.float32
        m = build_model(cfg, dtype, torch.device("cpu"), max_positions=512)
        load_weights(m, demo_dir)
        if method not in ("fp32", "bf16") and not method.startswith("kv_"):
            quantize_model(m, method)
        return m

    def logits_of(method: str) -> list[torch.Tensor]:
        model = model_for(method)
        with torch.inference_mode():
            if method.startswith("kv_"):
                kv = torch.bfloat16 if method == "kv_bf16" else torch.float32
                return [paged_logits(model, cfg, r, kv) for r in rows]
            return [model.forward_causal(torch.tensor([r]))[0] for r in rows]

    base = logits_of("fp32")
    out = {}
    for method in ["fp32", *methods]:
        logits = base if method == "fp32" else logits_of(method)
        nll, agree, count = 0.0, 0, 0
        for r, lg, ref in zip(rows, logits, base, strict=True):
            targets = torch.tensor(r[1:])
            nll += float(torch.nn.functional.cross_entropy(lg[:-1], targets, reduction="sum"))
            agree += int((lg.argmax(-1) == ref.argmax(-1)).sum())
            count += len(r) - 1
        out[method] = {
            "perplexity": round(math.exp(nll / count), 4),
            "top1_agreement_with_fp32": round(agree / sum(len(r) for r in rows), 5),
            "tokens": count,
        }
    return out


# ---------------------------------------------------------------- report


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    b = results["batched"]
    labels = ["engine\n(cpu kernels)", "engine\nbf16 KV", "engine\n(torch ref attn)"]
    values = [
        b["engine_cpu"]["output_tok_per_s"],
        b["engine_cpu_kv_bf16"]["output_tok_per_s"],
        b["engine_torch"]["output_tok_per_s"],
    ]
    labels += ["HF static\nbatching", "engine\nbf16", "HF static\nbf16"]
    values += [
        b["hf_static"]["output_tok_per_s"],
        b["bf16"]["engine"]["output_tok_per_s"],
        b["bf16"]["hf_static_bf16"]["output_tok_per_s"],
    ]
    colors = ["tab:blue", "tab:purple", "tab:cyan", "tab:orange", "tab:green", "tab:olive"]
    ax1.bar(labels, values, color=colors)
    ax1.axhline(b["compute_limit_tok_per_s"], color="k", ls="--", lw=1)
    ax1.text(
        3.4, b["compute_limit_tok_per_s"], "fp32 compute limit", va="bottom", ha="right", fontsize=8
    )
    for i, v in enumerate(values):
        ax1.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title(
        f"64 x (64 in, 64 out), greedy, fp32 unless marked - {results['machine']['summary']}",
        fontsize=9,
    )
    one = results["batch1"]
    names = list(one)
    vals = [one[k]["decode_tok_per_s"] for k in names]
    ax2.bar(names, vals, color=["tab:blue", "tab:green", "tab:purple", "tab:olive"][: len(names)])
    for i, v in enumerate(vals):
        ax2.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("decode tokens/s, batch 1")
    ax2.set_title("batch-1 decode (64-token prompt, 128 new, median of 3), same run", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--demo-model", type=Path, default=None, help="demo checkpoint folder")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dims = QUICK_DIMS if args.quick else DIMS
    wl = dict(
        n=8 if args.quick else 64, prompt_len=16 if args.quick else 64, new=8 if args.quick else 64
    )
    wl["vocab"] = dims["vocab_size"]
    one_new = 16 if args.quick else 128
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_average_start": load_average(),
            "load_note": LOAD_NOTE,
            # the reference's own speed is half of every ratio against it
            "torch": torch.__version__,
            "transformers": version("transformers"),
        },
    }
    amx = ", AMX" if cpu_has_amx() else ""
    results["machine"]["summary"] = f"{os.cpu_count()}-core x86_64{amx}, {args.threads} threads"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-llama"
        results["model"] = save_random_llama(path, dims)
        print("model", results["model"], flush=True)
        b: dict = {"workload": {k: wl[k] for k in ("n", "prompt_len", "new")}}
        shapes = matmul_shapes(dims, wl)
        peak_before = matmul_peak_gflops(shapes)
        b["engine_cpu"] = batched(path, "auto", wl)
        peak_after = matmul_peak_gflops(shapes)
        print("engine cpu", b["engine_cpu"], flush=True)
        b["engine_torch"] = batched(path, "torch", wl)
        print("engine torch", b["engine_torch"], flush=True)
        hf = hf_static(path, wl)
        hf_tokens = hf.pop("tokens")[:, wl["prompt_len"] :].tolist()
        b["hf_static"] = hf
        print("hf static", hf, flush=True)
        b["greedy_tokens_identical_to_hf"] = engine_tokens(path, wl) == hf_tokens
        # fp32 weights and compute over a bf16 KV cache (--kv-cache-dtype bfloat16)
        b["engine_cpu_kv_bf16"] = batched(path, "auto", wl, kv_cache_dtype="bfloat16")
        b["engine_cpu_kv_bf16"]["greedy_vs_hf_fp32"] = agreement(
            engine_tokens(path, wl, kv_cache_dtype="bfloat16"), hf_tokens
        )
        print("engine cpu, bf16 KV cache", b["engine_cpu_kv_bf16"], flush=True)
        b["bf16"] = bf16_arm(path, dims, wl, hf_tokens)
        print("bf16", b["bf16"], flush=True)
        peak = (peak_before + peak_after) / 2
        flops = workload_flops(dims, wl["n"], wl["prompt_len"], wl["new"])
        limit = wl["n"] * wl["new"] / (flops / (peak * 1e9))
        engine_wall = b["engine_cpu"]["output_tok_per_s"]
        b["compute_limit"] = {
            "method": "workload matmul FLOPs / best wall-clock torch.mm GFLOP/s on the "
            "workload's shapes, same process and thread count as the engine, mean of the "
            "peak measured just before and just after the engine's timed run",
            "threads": args.threads,
            "matmul_peak_gflops_before_engine": round(peak_before, 1),
            "matmul_peak_gflops_after_engine": round(peak_after, 1),
            "matmul_peak_gflops": round(peak, 1),
            "workload_gflop": round(flops / 1e9, 2),
            "limit_output_tok_per_s": round(limit, 1),
        }
        b.update(
            compute_limit_tok_per_s=round(limit, 1),
            engine_output_tok_per_s_wall=round(engine_wall, 1),
            engine_share_of_limit=round(engine_wall / limit, 3),
            engine_vs_hf_static=round(engine_wall / hf["output_tok_per_s"], 3),
            engine_kv_bf16_vs_hf_static=round(
                b["engine_cpu_kv_bf16"]["output_tok_per_s"] / hf["output_tok_per_s"], 3
            ),
            engine_kv_bf16_share_of_limit=round(
                b["engine_cpu_kv_bf16"]["output_tok_per_s"] / limit, 3
            ),
            engine_bf16_vs_fp32=round(b["bf16"]["engine"]["output_tok_per_s"] / engine_wall, 3),
            cpu_kernels_vs_torch_reference=round(
                b["engine_cpu"]["output_tok_per_s"] / b["engine_torch"]["output_tok_per_s"], 3
            ),
            # per CPU second: what the arms compare to when other jobs take the cores
            engine_vs_hf_static_cpu_time=round(
                b["engine_cpu"]["output_tok_per_cpu_s"] / hf["output_tok_per_cpu_s"], 3
            ),
        )
        results["batched"] = b
        print({k: b[k] for k in b if not isinstance(b[k], dict)}, flush=True)
        results["batch1"] = {
            q: batch_one(path, q, dims["vocab_size"], 64 if not args.quick else 16, one_new)
            for q in ("none", "int8", "fp8")
        }
        results["batch1"] = {
            ("fp32" if k == "none" else k): v for k, v in results["batch1"].items()
        }
        results["batch1"]["bf16"] = batch_one(
            path, "none", dims["vocab_size"], 64 if not args.quick else 16, one_new, "bfloat16"
        )
        fp32 = results["batch1"]["fp32"]["decode_tok_per_s"]
        fp32_cpu = results["batch1"]["fp32"]["decode_tok_per_cpu_s"]
        results["batch1_ratios"] = {
            "int8_vs_fp32": round(results["batch1"]["int8"]["decode_tok_per_s"] / fp32, 3),
            "fp8_vs_fp32": round(results["batch1"]["fp8"]["decode_tok_per_s"] / fp32, 3),
            "bf16_vs_fp32": round(results["batch1"]["bf16"]["decode_tok_per_s"] / fp32, 3),
            "int8_vs_fp32_cpu_time": round(
                results["batch1"]["int8"]["decode_tok_per_cpu_s"] / fp32_cpu, 3
            ),
            # not side by side: the issue measured llama.cpp on a quieter machine
            "fp32_vs_llama_cpp_f32_of_issue_not_same_run": round(fp32 / LLAMA_CPP_F32_ISSUE, 3),
        }
        print("batch 1", results["batch1"], results["batch1_ratios"], flush=True)
    from engine_worker.demo.checkpoint import ensure_demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:  # a 20-step demo model of its own, never the real one's folder
            demo = ensure_demo_checkpoint(args.demo_model or Path(tmp) / "demo", steps=20)
        else:
            demo = ensure_demo_checkpoint(args.demo_model)
        results["quality"] = {
            "model": "jetserve demo model (seed 0), held-out demo-corpus documents (seed 987654)",
            **quality(
                demo, ["int8", "fp8", "bf16", "kv_fp32", "kv_bf16"], docs=20 if args.quick else 300
            ),
        }
    print("quality", results["quality"], flush=True)
    results["machine"]["load_average_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
