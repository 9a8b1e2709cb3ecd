"""The CPU engine on issue 16's workload, before and after a change, side by side in one run.

Each arm is its own process importing one source tree: "before" a `git archive` of a
commit (default: main), "after" a copy of this checkout (or of --after's commit); a
Hugging Face static-batching arm runs alongside. The processes load once; each round the
two engines run the workload a few steps at a time in alternation (then HF its batch),
so both engines see the same load on a shared box whose load comes in bursts. Every round
uses its own prompts (never the warm-up's), so no timed run hits the prefix cache.

Per arm and round: output tokens/s of 64 prompts of 64 tokens, 64 new tokens each
(greedy). Per engine arm, one 64-sequence decode step taken apart with torch.profiler
(best of --profiles): matmul op time and its GFLOP/s, the other ops' time, and the rest of
the step's wall time (Python and host work between ops). Greedy tokens of all arms must
be identical.

    python benchmarks/cpu_decode_ab_bench.py                  # writes results/cpu_decode_ab.{json,png}
    python benchmarks/cpu_decode_ab_bench.py --quick          # tiny model, checks the script runs
    python benchmarks/cpu_decode_ab_bench.py --before HEAD~3 --rounds 8 --threads 1
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


# ---------------------------------------------------------------- arm processes


class EngineArm:
    """The engine of whichever tree is on PYTHONPATH, warmed up once."""

    def __init__(self, model: Path, wl: dict, dims: dict, engine_args: dict) -> None:
        from engine_worker.engine.config import EngineConfig
        from engine_worker.engine.llm_engine import LLMEngine

        self.wl, self.dims = wl, dims
        self.eng = LLMEngine(
            EngineConfig(
                model=str(model),
                max_num_seqs=wl["n"],
                max_num_batched_tokens=4096,
                kv_cache_memory=1 << 29,
                **engine_args,
            )
        )
        self._add(prompts(wl["n"], wl["prompt_len"], wl["vocab"], 10**6), 4, "warm")
        self._drain()

    def _add(self, batch: list[list[int]], new: int, tag: str) -> None:
        from shared.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(batch):
            self.eng.add_request(f"{tag}-{i}", p, params)

    def _drain(self) -> dict[str, list[int]]:
        got: dict[str, list[int]] = {}
        while self.eng.has_unfinished_requests():
            for out in self.eng.step():
                got.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
        return got

    def start(self, seed: int) -> dict:
        """Queue the round's batch; `steps` then runs it a few engine steps at a time, so
        the parent can interleave the arms finely on a box whose load comes in bursts."""
        wl = self.wl
        self.batch = prompts(wl["n"], wl["prompt_len"], wl["vocab"], seed)
        self.tag = f"run{seed}"
        self._add(self.batch, wl["new"], self.tag)
        self.got: dict[str, list[int]] = {}
        self.seconds = self.cpu = 0.0
        return {}

    def steps(self, count: int) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(count):
            if not self.eng.has_unfinished_requests():
                break
            for out in self.eng.step():
                self.got.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
        self.seconds += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        if self.eng.has_unfinished_requests():
            return {"done": False}
        wl = self.wl
        tokens = [self.got[f"{self.tag}-{i}"] for i in range(len(self.batch))]
        produced = sum(map(len, tokens))
        assert produced == len(self.batch) * wl["new"], produced
        return {
            "done": True,
            "output_tok_per_s": round(produced / self.seconds, 1),
            "output_tok_per_cpu_s": round(produced / self.cpu, 1),
            "seconds": round(self.seconds, 3),
            "prefix_hit_rate": round(self.eng.block_manager.prefix_hit_rate, 4),
            "tokens_digest": digest(tokens),
            "tokens": tokens,
        }

    def profile(self, seed: int) -> dict:
        """One decode step of a full batch, taken apart: matmul op time, the other ops'
        time, and what the profiled steps spent outside any op (Python, host work)."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        wl = self.wl
        self._add(prompts(wl["n"], wl["prompt_len"], wl["vocab"], seed), 32, f"prof{seed}")
        for _ in range(4):  # the prefill, then decodes
            self.eng.step()
        steps = 8
        t0 = time.perf_counter()
        for _ in range(steps):
            self.eng.step()
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                self.eng.step()
            profiled_ms = (time.perf_counter() - t0) / steps * 1e3
        self._drain()
        events = prof.key_averages()
        matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        ops_us = sum(e.self_cpu_time_total for e in events)
        matmul_ms = matmul_us / steps / 1e3
        other_ms = (ops_us - matmul_us) / steps / 1e3
        top = sorted(
            (
                (e.key, e.self_cpu_time_total / steps / 1e3)
                for e in events
                if e.key not in MATMUL_OPS
            ),
            key=lambda kv: -kv[1],
        )[:8]
        return {
            "threads": torch.get_num_threads(),
            "wall_ms": round(step_ms, 2),
            "profiled_wall_ms": round(profiled_ms, 2),
            "matmul_ms": round(matmul_ms, 2),
            "matmul_gflops": round(decode_step_gflop(self.dims, wl["n"]) / (matmul_ms / 1e3), 1),
            "other_ops_ms": round(other_ms, 2),
            "host_between_ops_ms": round(max(profiled_ms - matmul_ms - other_ms, 0.0), 2),
            "non_matmul_share_of_profiled_step": round(1 - matmul_ms / profiled_ms, 3),
            "top_other_ops_ms": {k: round(v, 3) for k, v in top},
        }


class HfArm:
    """Hugging Face static batching: the whole batch in one generate call."""

    def __init__(self, model: Path, wl: dict, dims: dict) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.wl = wl
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self._generate(10**6, 4)

    def _generate(self, seed: int, new: int):
        import torch

        wl = self.wl
        ids = torch.tensor(prompts(wl["n"], wl["prompt_len"], wl["vocab"], seed))
        with torch.inference_mode():
            return self.hf.generate(
                ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )

    def run(self, seed: int) -> dict:
        wl = self.wl
        t0, c0 = time.perf_counter(), time.process_time()
        out = self._generate(seed, wl["new"])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {
            "output_tok_per_s": round(wl["n"] * wl["new"] / seconds, 1),
            "output_tok_per_cpu_s": round(wl["n"] * wl["new"] / cpu, 1),
            "seconds": round(seconds, 3),
            "tokens_digest": digest(out[:, wl["prompt_len"] :].tolist()),
            "tokens": out[:, wl["prompt_len"] :].tolist(),
        }


def serve(kind: str, model: Path, wl: dict, dims: dict, engine_args: dict) -> None:
    """An arm process: build once, then run what the parent asks, one JSON line each."""
    arm = EngineArm(model, wl, dims, engine_args) if kind == "engine" else HfArm(model, wl, dims)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if "run" in cmd and isinstance(arm, HfArm):
            print(json.dumps(arm.run(cmd["run"])), flush=True)
        elif "start" in cmd and isinstance(arm, EngineArm):
            print(json.dumps(arm.start(cmd["start"])), flush=True)
        elif "steps" in cmd and isinstance(arm, EngineArm):
            print(json.dumps(arm.steps(cmd["steps"])), flush=True)
        elif "profile" in cmd and isinstance(arm, EngineArm):
            print(json.dumps(arm.profile(cmd["profile"])), flush=True)
        else:
            return


class Arm:
    """The parent's handle on one arm process."""

    def __init__(
        self,
        name: str,
        tree: Path,
        spec: list[str],
        threads: int | None,
        log: Path,
        extra_env: dict[str, str] | None = None,
    ):
        env = {**os.environ, **(extra_env or {}), "PYTHONPATH": str(tree)}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", *spec],
            env=env,
            cwd=tree,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )
        self.ask(None)

    def ask(self, cmd: dict | None) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"arm {self.name} exited (see its log)")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


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
            v = s[arm]["decode_step_best"][part]
            ax2.bar(j, v, bottom=bottom, color=color, label=part if j == 0 else None)
            bottom += v
        ax2.text(j, bottom, f"{bottom:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks([0, 1], ["before", "after"])
    ax2.set_ylabel("ms per 64-sequence decode step")
    ax2.set_title(
        "one 64-sequence decode step taken apart (torch.profiler, best of runs)", fontsize=9
    )
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def sequences_equal(got: list[list[int]], ref: list[list[int]]) -> float:
    """The share of sequences whose greedy tokens are all the reference's."""
    return round(sum(g == r for g, r in zip(got, ref, strict=True)) / len(ref), 3)


def summarize(runs: list[dict], profiles: list[dict] | None) -> dict:
    out = {
        "output_tok_per_s_median": statistics.median(r["output_tok_per_s"] for r in runs),
        "output_tok_per_cpu_s_median": statistics.median(r["output_tok_per_cpu_s"] for r in runs),
        "output_tok_per_s_runs": [r["output_tok_per_s"] for r in runs],
    }
    if profiles:  # the least disturbed of the profiled steps: the fastest
        out["decode_step_best"] = min(profiles, key=lambda p: p["profiled_wall_ms"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="main", help="git commit of the 'before' arm")
    ap.add_argument(
        "--after", default=None, help="git commit of the 'after' arm (default: this checkout)"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profiles", type=int, default=3, help="decode-step profiles per arm")
    ap.add_argument(
        "--chunk-steps", type=int, default=4, help="engine steps an arm runs before the other"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of every arm (default: torch's own, the core count); 1 keeps a "
        "busy box's preemptions out of the threads' barriers",
    )
    ap.add_argument(
        "--after-engine-args",
        type=json.loads,
        default={},
        help='engine settings of the "after" arm only, as JSON, e.g. \'{"kv_cache_dtype": '
        '"bfloat16"}\' with --before HEAD: one tree, two configurations (greedy tokens may '
        "then differ where a setting changes the numerics)",
    )
    ap.add_argument(
        "--after-env",
        type=json.loads,
        default={},
        help='environment variables of the "after" arm only, as JSON, e.g. '
        '\'{"THP_MEM_ALLOC_ENABLE": "1"}\' (torch\'s huge-page allocations)',
    )
    ap.add_argument(
        "--workload",
        help="N,PROMPT,NEW: sequences, prompt tokens, new tokens (default 64,64,64, the "
        "issue's); e.g. 16,1024,64 for long contexts, where attention weighs more",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_decode_ab.json")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # imports the engine of the tree on PYTHONPATH, nothing of ROOT's
        kind, model = args.child[0], Path(args.child[1])
        serve(kind, model, *(json.loads(a) for a in args.child[2:5]))
        return 0
    sys.path.insert(0, str(ROOT))
    from benchmarks.box_load import LOAD_NOTE, load_average
    from benchmarks.issue16_model import DIMS, QUICK_DIMS, make_model

    dims = QUICK_DIMS if args.quick else DIMS
    wl = dict(n=8, prompt_len=16, new=8) if args.quick else dict(n=64, prompt_len=64, new=64)
    if args.workload:
        wl = dict(zip(("n", "prompt_len", "new"), map(int, args.workload.split(",")), strict=True))
    wl["vocab"] = dims["vocab_size"]

    results: dict = {
        "workload": {k: wl[k] for k in ("n", "prompt_len", "new")} | {"greedy": True},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "summary": f"{os.cpu_count()}-core {platform.machine()}",
            "load_note": LOAD_NOTE,
        },
        "threads": args.threads or os.cpu_count(),
        "after_engine_args": args.after_engine_args,
        "after_env": args.after_env,
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
        trees = {"before": before_tree, "after": after_tree, "hf_static": after_tree}
        arms = {}
        try:
            for name, tree in trees.items():
                kind = "hf" if name == "hf_static" else "engine"
                engine_args = args.after_engine_args if name == "after" else {}
                spec = [kind, str(model), json.dumps(wl), json.dumps(dims), json.dumps(engine_args)]
                env = {k: str(v) for k, v in args.after_env.items()} if name == "after" else None
                log = Path(tmp) / f"{name}.log"
                arms[name] = Arm(name, tree, spec, args.threads, log, env)
                print(f"arm {name} ready", flush=True)
            engines = ["before", "after"]
            for r in range(args.rounds):
                row: dict = {"load_average": load_average()}
                # the engines a few steps at a time, alternating who goes first
                for name in engines:
                    arms[name].ask({"start": r})
                pending, chunk = set(engines), 0
                while pending:
                    order = engines if chunk % 2 == 0 else engines[::-1]
                    for name in order:
                        if name in pending:
                            reply = arms[name].ask({"steps": args.chunk_steps})
                            if reply["done"]:
                                row[name] = reply
                                pending.discard(name)
                    chunk += 1
                row["hf_static"] = arms["hf_static"].ask({"run": r})
                row["after_sequences_equal_to_hf"] = sequences_equal(
                    row["after"]["tokens"], row["hf_static"]["tokens"]
                )
                for name in trees:
                    row[name].pop("tokens")
                    print(f"round {r} {name}: {json.dumps(row[name])}", flush=True)
                row["tokens_identical"] = len({row[a]["tokens_digest"] for a in trees}) == 1
                results["rounds"].append(row)
            results["profiles"] = {"before": [], "after": []}
            for i in range(args.profiles):
                for name in ["before", "after"] if i % 2 == 0 else ["after", "before"]:
                    results["profiles"][name].append(arms[name].ask({"profile": 5000 + i}))
                    print(f"profile {name}: {results['profiles'][name][-1]}", flush=True)
        finally:
            for arm in arms.values():
                arm.close()
    rounds = results["rounds"]
    results["load_average"] = load_average()
    profiles = results["profiles"]
    s = {
        arm: summarize([r[arm] for r in rounds], profiles.get(arm))
        for arm in ("before", "after", "hf_static")
    }
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
    s["after_vs_before_median_of_rounds"] = statistics.median(s["after_vs_before_per_round"])
    s["after_vs_hf_static_median_of_rounds"] = statistics.median(
        r["after"]["output_tok_per_s"] / r["hf_static"]["output_tok_per_s"] for r in rounds
    )
    s["after_vs_before_cpu_time"] = round(
        s["after"]["output_tok_per_cpu_s_median"] / s["before"]["output_tok_per_cpu_s_median"], 3
    )
    s["greedy_tokens_identical_all_arms"] = all(r["tokens_identical"] for r in rounds)
    s["after_sequences_equal_to_hf_per_round"] = [r["after_sequences_equal_to_hf"] for r in rounds]
    results["summary"] = s
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
