"""Tensor parallelism on CPU: step time of TP=2 (two rank processes, gloo, one thread
each) against TP=1 (one process, two threads), same weights, same requests, and whether
their greedy tokens are identical.

A third arm runs TP=1 with one thread, the threads each rank has.

On a 2-core CPU TP=2 is expected to be SLOWER: both arms get the same two cores, TP
splits each matmul in two smaller ones (less efficient), and adds two all-reduces per
layer plus a broadcast of the step's inputs through loopback TCP. TP pays off when a
model does not fit one device, not here; this measures its cost.

    python benchmarks/tp_bench.py            # writes benchmarks/results/tp.{json,png}
    python benchmarks/tp_bench.py --quick    # tiny model, seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.issue16_model import make_model
from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from shared.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results"


def run(engine: LLMEngine, prompts: list[list[int]], new: int) -> tuple[dict, list[list[int]]]:
    """All prompts at once; per-step wall times split into prefill and decode steps."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    prefill, decode = [], []
    while engine.has_unfinished_requests():
        is_decode = all(s.num_computed_tokens + 1 == s.num_tokens for s in engine.scheduler.running)
        is_decode = is_decode and not engine.scheduler.waiting
        t0 = time.perf_counter()
        outputs = engine.step()
        (decode if is_decode else prefill).append(time.perf_counter() - t0)
        for o in outputs:
            out[o.request_id].extend(t for d in o.deltas for t in d.token_ids)
    return {
        "prefill_s": round(sum(prefill), 4),
        "decode_step_ms_median": round(1000 * statistics.median(decode), 3),
        "decode_steps": len(decode),
    }, [out[str(i)] for i in range(len(prompts))]


def measure(path: Path, tp: int, threads: int, cases: dict, rounds: int) -> tuple[dict, dict]:
    torch.set_num_threads(threads)
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            tensor_parallel_size=tp,
            max_num_seqs=64,
            max_num_batched_tokens=4096,
            kv_cache_memory=1 << 29,
            enable_prefix_caching=False,  # every round recomputes its prompts
        )
    )
    try:
        run(engine, cases["batch 1"][0][:1], 4)  # warm-up (kernels built, caches touched)
        results: dict = {}
        tokens: dict = {}
        for name, (prompts, new) in cases.items():
            rows = []
            for _ in range(rounds):
                row, tokens[name] = run(engine, prompts, new)
                rows.append(row)
            results[name] = {
                "decode_step_ms_median": round(
                    statistics.median(r["decode_step_ms_median"] for r in rows), 3
                ),
                "prefill_s_median": round(statistics.median(r["prefill_s"] for r in rows), 4),
                "rounds": rows,
            }
    finally:
        engine.close()
    return results, tokens


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results["tp1"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "decode_step_ms_median", "decode step (ms, median)"),
        (axes[1], "prefill_s_median", "prefill of the batch (s, median)"),
    ):
        xs = range(len(cases))
        one = [results["tp1"][c][key] for c in cases]
        one_1t = [results["tp1_one_thread"][c][key] for c in cases]
        two = [results["tp2"][c][key] for c in cases]
        ax.bar([x - 0.27 for x in xs], one, 0.27, label="TP=1 (1 process, 2 threads)")
        ax.bar(list(xs), one_1t, 0.27, label="TP=1 (1 process, 1 thread)")
        ax.bar([x + 0.27 for x in xs], two, 0.27, label="TP=2 (2 ranks, 1 thread each)")
        for x, a, b in zip(xs, one_1t, two, strict=True):
            ax.text(x + 0.27, b, f"{b / a:.2f}x of 1 thread", ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), cases)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"TP=2 vs TP=1 on {results['machine']} (shared; load {results['load_average']}); "
        f"greedy identical: {results['greedy_identical']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "tp.json")
    args = ap.parse_args()
    threads = 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "issue16-llama"
        info = make_model(path, quick=args.quick)
        rng = random.Random(0)
        vocab = info["vocab_size"]
        prompt_len, new = (8, 4) if args.quick else (64, 32)
        batch = 4 if args.quick else 64
        cases = {
            "batch 1": ([[rng.randrange(3, vocab) for _ in range(prompt_len)]], new * 2),
            f"batch {batch}": (
                [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch)],
                new,
            ),
        }
        load_before = os.getloadavg()
        tp1, tokens1 = measure(path, 1, threads, cases, args.rounds)
        print("TP=1", {k: v["decode_step_ms_median"] for k, v in tp1.items()}, flush=True)
        tp2, tokens2 = measure(path, 2, threads, cases, args.rounds)
        print("TP=2", {k: v["decode_step_ms_median"] for k, v in tp2.items()}, flush=True)
        # One thread, as each TP rank has: on a loaded machine a 2-thread OpenMP team
        # waits at every barrier for a core another job holds, which one thread never does.
        tp1_1t, tokens1_1t = measure(path, 1, 1, cases, args.rounds)
        print("TP=1 1 thread", {k: v["decode_step_ms_median"] for k, v in tp1_1t.items()})
    results = {
        "model": {**info, "dtype": "float32"},
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "shared_machine": True,
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "load_average_note": "1/5/15-minute load before, then after the run",
        "threads": "TP=1: one process with 2 torch threads; TP=2: 2 ranks with 1 thread each",
        "workload": {
            name: {"requests": len(p), "prompt_tokens": len(p[0]), "new_tokens": n}
            for name, (p, n) in cases.items()
        },
        "tp1": tp1,
        "tp2": tp2,
        "tp1_one_thread": tp1_1t,
        "tp2_over_tp1_one_thread_decode_step": {
            c: round(tp2[c]["decode_step_ms_median"] / tp1_1t[c]["decode_step_ms_median"], 3)
            for c in tp1
        },
        "tp2_over_tp1_decode_step": {
            c: round(tp2[c]["decode_step_ms_median"] / tp1[c]["decode_step_ms_median"], 3)
            for c in tp1
        },
        "greedy_identical": tokens1 == tokens2 == tokens1_1t,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    keys = ("tp2_over_tp1_decode_step", "tp2_over_tp1_one_thread_decode_step", "greedy_identical")
    print(json.dumps({k: results[k] for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
