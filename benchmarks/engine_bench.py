"""Engine throughput vs Hugging Face generate, and KV-cache memory waste.

One run, one random Llama (fp32, CPU by default), one set of mixed-length prompts:
- the engine at concurrency 1, 8, 32, 64 (max running sequences; requests refill slots
  as others finish: continuous batching),
- HF `generate` one request at a time,
- HF static batching with left padding (a batch runs until its longest request is done).
Output tokens/s counts only the tokens each request asked for. KV waste is the share of
allocated KV slots that hold no token, sampled every engine step.

    python benchmarks/engine_bench.py            # writes benchmarks/results/engine.{json,png}
    python benchmarks/engine_bench.py --quick    # tiny model, seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.random_llama import save_random_llama
from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from shared.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results"


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    def subset(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.output_lens[:n])

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_model(path: Path, quick: bool) -> dict:
    if quick:
        dims = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            vocab_size=512,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    else:
        dims = dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            vocab_size=16000,
            num_attention_heads=12,
            num_key_value_heads=4,
        )
    return save_random_llama(path, dims)


def make_workload(
    n: int, vocab: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0
) -> Workload:
    rng = random.Random(seed)
    (in_lo, in_hi), (out_lo, out_hi) = input_len, output_len
    prompts = [
        [rng.randrange(2, vocab) for _ in range(rng.randint(in_lo, in_hi))] for _ in range(n)
    ]
    return Workload(prompts, [rng.randint(out_lo, out_hi) for _ in range(n)])


def run_engine(path: Path, wl: Workload, concurrency: int, block_size: int) -> dict:
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            max_num_seqs=concurrency,
            block_size=block_size,
            kv_cache_memory=1 << 30,
            max_num_batched_tokens=2048,
        )
    )
    for i, (p, n) in enumerate(zip(wl.prompts, wl.output_lens, strict=True)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    produced, allocated_slots, used_slots, steps = 0, 0, 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced += sum(len(d.token_ids) for d in out.deltas)
        running = engine.scheduler.running
        allocated_slots += sum(len(s.block_table) for s in running) * block_size
        used_slots += sum(s.num_computed_tokens for s in running)
        steps += 1
    elapsed = time.perf_counter() - t0
    assert produced == wl.output_tokens, (produced, wl.output_tokens)
    return {
        "concurrency": concurrency,
        "requests": len(wl.prompts),
        "output_tokens": produced,
        "seconds": round(elapsed, 3),
        "output_tok_per_s": round(produced / elapsed, 2),
        "steps": steps,
        "kv_waste_perc": round(100 * (1 - used_slots / allocated_slots), 2)
        if allocated_slots
        else 0,
    }


def run_hf_one_at_a_time(model, wl: Workload) -> dict:
    t0 = time.perf_counter()
    for p, n in zip(wl.prompts, wl.output_lens, strict=True):
        out = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == len(p) + n
    elapsed = time.perf_counter() - t0
    return {
        "requests": len(wl.prompts),
        "output_tokens": wl.output_tokens,
        "seconds": round(elapsed, 3),
        "output_tok_per_s": round(wl.output_tokens / elapsed, 2),
    }


def run_hf_static(model, wl: Workload, batch_size: int) -> dict:
    t0 = time.perf_counter()
    padded_slots = 0
    for start in range(0, len(wl.prompts), batch_size):
        prompts = wl.prompts[start : start + batch_size]
        n = max(wl.output_lens[start : start + batch_size])
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        padded_slots += len(prompts) * (width + n)
    elapsed = time.perf_counter() - t0
    used = sum(len(p) + n for p, n in zip(wl.prompts, wl.output_lens, strict=True))
    return {
        "batch_size": batch_size,
        "requests": len(wl.prompts),
        "output_tokens": wl.output_tokens,
        "seconds": round(elapsed, 3),
        "output_tok_per_s": round(wl.output_tokens / elapsed, 2),
        "kv_waste_perc": round(100 * (1 - used / padded_slots), 2),
    }


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"engine c={r['concurrency']}" for r in results["engine"]]
    values = [r["output_tok_per_s"] for r in results["engine"]]
    labels += ["HF one-at-a-time", f"HF static b={results['hf_static']['batch_size']}"]
    values += [
        results["hf_one_at_a_time"]["output_tok_per_s"],
        results["hf_static"]["output_tok_per_s"],
    ]
    colors = ["tab:blue"] * len(results["engine"]) + ["tab:gray", "tab:orange"]
    ax1.bar(labels, values, color=colors)
    ax1.set_ylabel("output tokens/s")
    wl = results["workload"]
    ax1.set_title(
        f"{results['model']['params_millions']}M-param Llama fp32, {results['machine']}\n"
        f"input {wl['input_len']}, output {wl['output_len']} tokens",
        fontsize=9,
    )
    ax1.tick_params(axis="x", rotation=30)
    for i, v in enumerate(values):
        ax1.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    waste = results["kv_waste"]
    ax2.bar(list(waste), list(waste.values()), color=["tab:blue", "tab:blue", "tab:orange"])
    ax2.set_ylabel("% of KV slots allocated but unused")
    ax2.set_title("KV memory waste, mixed lengths")
    ax2.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--input-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=[64, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--hf-one-requests", type=int, default=8)
    ap.add_argument(
        "--requests-per-slot",
        type=int,
        default=4,
        help="requests per unit of concurrency: enough that the draining tail is small",
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=RESULTS / "engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-llama"
        model_info = make_model(path, args.quick)
        n_max = max(args.concurrency)
        input_len = (4, 24) if args.quick else tuple(args.input_len)
        output_len = (4, 16) if args.quick else tuple(args.output_len)
        wl = make_workload(
            max(args.requests_per_slot * n_max, 16), model_info["vocab_size"], input_len, output_len
        )
        results: dict = {
            "model": model_info,
            "machine": f"{platform.machine()} CPU x{args.threads} threads",
            "workload": {
                "requests": len(wl.prompts),
                "input_len": f"uniform {input_len[0]}-{input_len[1]}",
                "output_len": f"uniform {output_len[0]}-{output_len[1]}",
                "ignore_eos": True,
            },
            "engine": [],
        }
        for c in args.concurrency:
            n = max(args.requests_per_slot * c, 16)
            r = run_engine(path, wl.subset(n), c, block_size=16)
            print("engine", r, flush=True)
            results["engine"].append(r)
        waste8 = run_engine(path, wl.subset(2 * n_max), n_max, block_size=8)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.inference_mode():
            results["hf_one_at_a_time"] = run_hf_one_at_a_time(hf, wl.subset(args.hf_one_requests))
            print("hf one", results["hf_one_at_a_time"], flush=True)
            results["hf_static"] = run_hf_static(
                hf, wl.subset(args.requests_per_slot * n_max), batch_size=n_max
            )
            print("hf static", results["hf_static"], flush=True)
    top = results["engine"][-1]["output_tok_per_s"]
    results["speedup_vs_hf_one"] = round(top / results["hf_one_at_a_time"]["output_tok_per_s"], 2)
    results["speedup_vs_hf_static"] = round(top / results["hf_static"]["output_tok_per_s"], 2)
    results["kv_waste"] = {
        "engine block 16": results["engine"][-1]["kv_waste_perc"],
        "engine block 8": waste8["kv_waste_perc"],
        "HF static (contiguous, padded)": results["hf_static"]["kv_waste_perc"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(
        json.dumps(
            {k: results[k] for k in ("speedup_vs_hf_one", "speedup_vs_hf_static", "kv_waste")}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
