"""The CPU engine on issue 16's workload, before and after a change, side by side in one run.

Each arm is a fresh process importing one source tree: "before" a `git archive` of a
commit (default: main), "after" this checkout; a Hugging Face static-batching arm runs
alongside. Rounds interleave the arms (order alternating round by round) so all of them
see the same load on a shared box; every round uses its own prompts, and each process
warms up on other prompts, so no timed run hits the prefix cache.

Per engine arm: output tokens/s of 64 prompts of 64 tokens, 64 new tokens each (greedy),
and one 64-sequence decode step taken apart with torch.profiler: matmul op time (and its
GFLOP/s), the other ops' time, and the rest of the step's wall time (Python and host work
between ops). Greedy tokens of all arms must be identical.

    python benchmarks/cpu_decode_ab_bench.py                  # writes results/cpu_decode_ab.{json,png}
    python benchmarks/cpu_decode_ab_bench.py --quick          # tiny model, checks the script runs
    python benchmarks/cpu_decode_ab_bench.py --before HEAD~3 --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Self-time of these ops is matmul time; everything else the profiler sees is "other ops".
MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "mkldnn::_linear_pointwise",
    "jetserve_cpu::decode_linear",
    "jetserve_cpu::packed_linear",
)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


def digest(tokens: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


def decode_step_gflop(dims: dict, rows: int) -> float:
    """Matmul FLOPs of one decode step of `rows` sequences (projections and LM head)."""
    h, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    head_dim = h // dims["num_attention_heads"]
    qkv = h * (dims["num_attention_heads"] + 2 * dims["num_key_value_heads"]) * head_dim
    per_token = layers * (qkv + h * h + 3 * h * inter) + h * dims["vocab_size"]
    return 2 * rows * per_token / 1e9


# ---------------------------------------------------------------- child processes


def child_engine(model: Path, wl: dict, round_: int, dims: dict) -> dict:
    import torch

    from engine_worker.engine.config import EngineConfig
    from engine_worker.engine.llm_engine import LLMEngine
    from shared.sampling_params import SamplingParams

    eng = LLMEngine(
        EngineConfig(
            model=str(model),
            max_num_seqs=wl["n"],
            max_num_batched_tokens=4096,
            kv_cache_memory=1 << 29,
        )
    )

    def add(batch: list[list[int]], new: int, tag: str) -> None:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(batch):
            eng.add_request(f"{tag}-{i}", p, params)

    def drain() -> dict[str, list[int]]:
        got: dict[str, list[int]] = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                got.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
        return got

    add(prompts(wl["n"], wl["prompt_len"], wl["vocab"], 1000 + round_), 4, "warm")
    drain()
    batch = prompts(wl["n"], wl["prompt_len"], wl["vocab"], round_)
    add(batch, wl["new"], "timed")
    t0 = time.perf_counter()
    got = drain()
    seconds = time.perf_counter() - t0
    tokens = [got[f"timed-{i}"] for i in range(len(batch))]
    hits = eng.block_manager.prefix_hit_rate

    # One decode step of a full batch, taken apart.
    add(prompts(wl["n"], wl["prompt_len"], wl["vocab"], 5000 + round_), 64, "prof")
    for _ in range(4):  # the prefill, then decodes
        eng.step()
    steps = 8
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        profiled_ms = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    ops_us = sum(e.self_cpu_time_total for e in events)
    matmul_ms = matmul_us / steps / 1e3
    other_ms = (ops_us - matmul_us) / steps / 1e3
    top = sorted(
        ((e.key, e.self_cpu_time_total / steps / 1e3) for e in events if e.key not in MATMUL_OPS),
        key=lambda kv: -kv[1],
    )[:8]
    gflop = decode_step_gflop(dims, wl["n"])
    return {
        "output_tok_per_s": round(len(batch) * wl["new"] / seconds, 1),
        "seconds": round(seconds, 3),
        "prefix_hit_rate": hits,
        "tokens_digest": digest(tokens),
        "threads": torch.get_num_threads(),
        "decode_step": {
            "wall_ms": round(step_ms, 2),
            "matmul_ms": round(matmul_ms, 2),
            "matmul_gflops": round(gflop / (matmul_ms / 1e3), 1),
            "other_ops_ms": round(other_ms, 2),
            # what the profiled step spent outside every op: Python and host work
            "host_between_ops_ms": round(max(profiled_ms - matmul_ms - other_ms, 0.0), 2),
            "profiled_wall_ms": round(profiled_ms, 2),
            "non_matmul_share_of_profiled_step": round(1 - matmul_ms / profiled_ms, 3),
            "top_other_ops_ms": {k: round(v, 3) for k, v in top},
        },
    }


def child_hf(model: Path, wl: dict, round_: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    warm = torch.tensor(prompts(wl["n"], wl["prompt_len"], wl["vocab"], 1000 + round_))
    ids = torch.tensor(prompts(wl["n"], wl["prompt_len"], wl["vocab"], round_))
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(warm, max_new_tokens=4, min_new_tokens=4, **kw)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=wl["new"], min_new_tokens=wl["new"], **kw)
        seconds = time.perf_counter() - t0
    return {
        "output_tok_per_s": round(wl["n"] * wl["new"] / seconds, 1),
        "seconds": round(seconds, 3),
        "tokens_digest": digest(out[:, wl["prompt_len"] :].tolist()),
    }


# ---------------------------------------------------------------- the run


def export_tree(ref: str, into: Path) -> str:
    """A plain copy of `ref`'s files (no worktree, no checkout of ours touched)."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True
    ).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def snapshot_checkout(into: Path) -> str:
    """A copy of this checkout's files as they are now (tracked and untracked, ignored ones
    left out), so edits made while the benchmark runs reach no arm."""
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    for name in filter(None, listing.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            dst = into / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{head} and the checkout's uncommitted changes"


def run_child(tree: Path, args: list[str], threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    names = ["before", "after", "hf_static"]
    labels = [f"engine before\n({results['before_commit']})", "engine after", "HF static"]
    vals = [s[n]["output_tok_per_s_median"] for n in names]
    ax1.bar(labels, vals, color=["tab:gray", "tab:blue", "tab:orange"])
    for i, v in enumerate(vals):
        ax1.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("output tokens/s (median of rounds)")
    ax1.set_title(
        f"issue-16 workload, {results['machine']['summary']}, load {results['load_average']}",
        fontsize=9,
    )
    parts = ["matmul_ms", "other_ops_ms", "host_between_ops_ms"]
    colors = ["tab:blue", "tab:green", "tab:red"]
    for j, arm in enumerate(["before", "after"]):
        bottom = 0.0
        for part, color in zip(parts, colors, strict=True):
            v = s[arm]["decode_step_median"][part]
            ax2.bar(j, v, bottom=bottom, color=color, label=part if j == 0 else None)
            bottom += v
        ax2.text(j, bottom, f"{bottom:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks([0, 1], ["before", "after"])
    ax2.set_ylabel("ms per 64-sequence decode step")
    ax2.set_title("one decode step taken apart (torch.profiler)", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def summarize(runs: list[dict]) -> dict:
    out = {"output_tok_per_s_median": statistics.median(r["output_tok_per_s"] for r in runs)}
    out["output_tok_per_s_runs"] = [r["output_tok_per_s"] for r in runs]
    if "decode_step" in runs[0]:
        keys = ["wall_ms", "matmul_ms", "matmul_gflops", "other_ops_ms", "host_between_ops_ms"]
        out["decode_step_median"] = {
            k: round(statistics.median(r["decode_step"][k] for r in runs), 2) for k in keys
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="main", help="git commit of the 'before' arm")
    ap.add_argument(
        "--after", default=None, help="git commit of the 'after' arm (default: this checkout)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of every arm (default: torch's own, the core count); 1 keeps a "
        "busy box's preemptions out of the threads' barriers",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_decode_ab.json")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # imports the engine of the tree on PYTHONPATH, nothing of ROOT's
        kind, model, round_ = args.child[0], Path(args.child[1]), int(args.child[2])
        wl, dims = json.loads(args.child[3]), json.loads(args.child[4])
        r = (
            child_engine(model, wl, round_, dims)
            if kind == "engine"
            else child_hf(model, wl, round_)
        )
        print(json.dumps(r))
        return 0
    sys.path.insert(0, str(ROOT))
    from benchmarks.issue16_model import DIMS, QUICK_DIMS, make_model

    dims = QUICK_DIMS if args.quick else DIMS
    wl = dict(n=8, prompt_len=16, new=8) if args.quick else dict(n=64, prompt_len=64, new=64)
    wl["vocab"] = dims["vocab_size"]

    results: dict = {
        "workload": {k: wl[k] for k in ("n", "prompt_len", "new")} | {"greedy": True},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "summary": f"{os.cpu_count()}-core {platform.machine()}",
            "shared": "a box shared with other jobs: compare the arms of this one run",
        },
        "threads": args.threads or os.cpu_count(),
        "load_average_start": load_average(),
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        results["before_commit"] = export_tree(args.before, before_tree)
        after_tree = Path(tmp) / "after"
        if args.after is None:
            results["after_commit"] = snapshot_checkout(after_tree)
        else:
            results["after_commit"] = export_tree(args.after, after_tree)
        model = Path(tmp) / "model"
        results["model"] = make_model(model, args.quick)
        trees = {"before": before_tree, "after": after_tree}
        for r in range(args.rounds):
            order = ["before", "after", "hf_static"]
            if r % 2:
                order = ["after", "before", "hf_static"]
            row: dict = {"load_average": load_average()}
            for arm in order:
                kind = "hf" if arm == "hf_static" else "engine"
                spec = [kind, str(model), str(r), json.dumps(wl), json.dumps(dims)]
                row[arm] = run_child(trees.get(arm, ROOT), spec, args.threads)
                print(f"round {r} {arm}: {json.dumps(row[arm])}", flush=True)
            row["tokens_identical"] = len({row[a]["tokens_digest"] for a in order}) == 1
            results["rounds"].append(row)
    rounds = results["rounds"]
    results["load_average"] = load_average()
    s = {arm: summarize([r[arm] for r in rounds]) for arm in ("before", "after", "hf_static")}
    s["after_vs_before"] = round(
        s["after"]["output_tok_per_s_median"] / s["before"]["output_tok_per_s_median"], 3
    )
    s["after_vs_hf_static"] = round(
        s["after"]["output_tok_per_s_median"] / s["hf_static"]["output_tok_per_s_median"], 3
    )
    s["before_vs_hf_static"] = round(
        s["before"]["output_tok_per_s_median"] / s["hf_static"]["output_tok_per_s_median"], 3
    )
    s["after_vs_before_per_round"] = [
        round(r["after"]["output_tok_per_s"] / r["before"]["output_tok_per_s"], 3) for r in rounds
    ]
    s["greedy_tokens_identical_all_arms"] = all(r["tokens_identical"] for r in rounds)
    results["summary"] = s
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
