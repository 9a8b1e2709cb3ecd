"""The C++ CPU paged attention alone, at decode shapes: time per call, per unit of work
and GFLOP/s, with the cache warm (it fits the caches) and cold (200 MB touched between
calls, as a decode step's weights do).

The unit is one (sequence, KV head, 16 context positions) with all of that head's query
rows: what the kernel's inner loops handle at a time. Its two budgets, at 64 dims and 4
rows: arithmetic (2 x 2 x rows x dims FLOPs a position, 16 KFLOP a unit) at the matmuls'
150-250 GFLOP/s would take 65-110 ns; the unit's 8 KB of fp32 K/V (4 KB in bf16) at the
~12 GB/s two threads read from memory on the 2-core Xeon take ~680 ns (~340). A unit
cold from memory costs what its bytes do.

    python benchmarks/cpu_attention_bench.py [--before REV] \
        [--out benchmarks/results/cpu_attention.json]

`--before REV` builds that commit's kernels beside this checkout's (their op namespace
renamed) and times the two in alternation, call by call, on the same tensors: on a box
whose speed moves by tens of percent from minute to minute, separate runs cannot tell
a 20% change.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.box_load import LOAD_NOTE, load_average
from jetserve_kernels.cpu.build import compile_library
from jetserve_kernels.cpu.ops import available, paged_attention_cpu
from tests.support.paged_batch import build_paged_batch

ROOT = Path(__file__).resolve().parent.parent

# (label, sequences, context tokens, query heads, KV heads, head dim): the issue-16
# benchmark model's decode step (8 layers of 8/2 heads of 64), longer contexts, and
# Llama-3.1-8B's heads (32/8 of 128).
SHAPES = [
    ("64x96 8/2x64", 64, 96, 8, 2, 64),
    ("64x512 8/2x64", 64, 512, 8, 2, 64),
    ("8x2048 8/2x64", 8, 2048, 8, 2, 64),
    ("16x512 32/8x128", 16, 512, 32, 8, 128),
]
# (model dtype: the query's and output's, KV cache dtype)
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),  # --kv-cache-dtype bfloat16 under fp32 weights
    (torch.bfloat16, torch.bfloat16),  # a bf16 model
]
BLOCK_SIZE = 16
EVICT_BYTES = 200 * 2**20


# Where the CPU kernels live now, and where they lived before the package took a name of
# its own (a `kernels` top-level package collided with the Hugging Face distribution).
KERNEL_FOLDERS = ("kernels/jetserve_kernels/cpu", "kernels/cpu")


def _exists_at(rev: str, path: str) -> bool:
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{rev}:{path}"], cwd=ROOT, capture_output=True
    )
    return found.returncode == 0


def build_before(rev: str, into: Path) -> object:
    """`rev`'s CPU kernels as ``torch.ops.jetserve_cpu_before``: its sources with the op
    namespace renamed, built with this checkout's flags (the libraries load RTLD_LOCAL,
    so neither binds to the other's symbols)."""
    folder = next(f for f in KERNEL_FOLDERS if _exists_at(rev, f))
    archive = subprocess.run(
        ["git", "archive", rev, folder], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    sources = sorted((into / folder).glob("*.cpp"))
    for src in sources:
        text = src.read_text().replace("(jetserve_cpu,", "(jetserve_cpu_before,")
        src.write_text(text)
    print(f"building {rev}'s kernels (a minute or two)", flush=True)
    compile_library("jetserve_cpu_before", sources, into)
    return torch.ops.jetserve_cpu_before


def resolve(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def describe_checkout() -> str:
    """This checkout's commit, marked when its kernels differ from it."""
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", KERNEL_FOLDERS[0]], cwd=ROOT)
    return resolve("HEAD") + (" with uncommitted kernel changes" if dirty.returncode else "")


def time_calls(calls: dict, reps: int, evict: torch.Tensor | None) -> dict[str, float]:
    """Median seconds of each call over `reps`, the calls alternating, each after touching
    `evict` if given."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for _ in range(reps):
        order.reverse()  # neither arm always runs right after the eviction or the other
        for name in order:
            call = calls[name]
            if evict is not None:
                evict.add_(1.0)
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(
    shape: tuple,
    dtypes: tuple[torch.dtype, torch.dtype],
    reps: int,
    evict: torch.Tensor,
    before: object,
) -> dict[str, dict]:
    """This checkout's kernel ("after") and, if given, `before`'s, on the same tensors."""
    label, seqs, ctx, hq, hkv, d = shape
    batch = build_paged_batch([1] * seqs, [ctx] * seqs, hq, hkv, d, BLOCK_SIZE, seed=1)
    model_dtype, cache_dtype = dtypes
    k_cache, v_cache = batch.k_cache.to(cache_dtype), batch.v_cache.to(cache_dtype)
    query = batch.query.to(model_dtype)
    args = (query, k_cache, v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, d**-0.5)  # fmt: skip
    calls = {"after": lambda: paged_attention_cpu(*args)}
    if before is not None:
        calls["before"] = lambda: before.paged_attention(*args, 16)  # type: ignore[attr-defined]
        atol = 1e-4 if model_dtype == torch.float32 else 2e-2  # a 16-bit output's ulp
        torch.testing.assert_close(calls["before"](), calls["after"](), atol=atol, rtol=0)
    for _ in range(3):
        for call in calls.values():
            call()
    warm = time_calls(calls, reps, None)
    cold = time_calls(calls, max(reps // 4, 5), evict)
    units = seqs * hkv * -(-ctx // 16)
    flops = 4 * seqs * hq * ctx * d  # q.k and p.v, 2 FLOPs a multiply-add
    return {
        arm: {
            "shape": label,
            "model_dtype": str(model_dtype).removeprefix("torch."),
            "cache_dtype": str(cache_dtype).removeprefix("torch."),
            "kv_bytes": 2 * seqs * ctx * hkv * d * k_cache.element_size(),
            "warm_us": round(warm[arm] * 1e6, 1),
            "cold_us": round(cold[arm] * 1e6, 1),
            "warm_ns_per_unit": round(warm[arm] * 1e9 / units, 1),
            "cold_ns_per_unit": round(cold[arm] * 1e9 / units, 1),
            "warm_gflop_s": round(flops / warm[arm] / 1e9, 1),
            "cold_gflop_s": round(flops / cold[arm] / 1e9, 1),
        }
        for arm in calls
    }


def plot(rows: list[dict], before: list[dict] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']} {r.get('model_dtype', 'float32')}/{r['cache_dtype']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("warm", "cold"), strict=True):
        y = range(len(rows))
        after = [r[f"{key}_gflop_s"] for r in rows]
        if before:
            ax.barh([i + 0.2 for i in y], [r[f"{key}_gflop_s"] for r in before], 0.4,
                    label="before")  # fmt: skip
            ax.barh([i - 0.2 for i in y], after, 0.4, label="after")
            ax.legend()
        else:
            ax.barh(list(y), after)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GFLOP/s")
        ax.set_title(f"paged attention, decode, cache {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--before", help="a git commit whose kernels to time alongside")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "cpu_attention.json")
    )
    args = parser.parse_args()
    if not available():
        sys.exit("the C++ CPU kernels cannot be built on this host")
    torch.set_num_threads(args.threads)
    evict = torch.zeros(EVICT_BYTES // 4)
    with tempfile.TemporaryDirectory() as tmp:
        before = build_before(args.before, Path(tmp)) if args.before else None
        load_before = load_average()
        arms: dict[str, list[dict]] = {}
        for shape in SHAPES:
            for dtypes in DTYPES:
                for arm, row in measure(shape, dtypes, args.reps, evict, before).items():
                    arms.setdefault(arm, []).append(row)
                    print(arm, json.dumps(row), flush=True)
    result = {
        "benchmark": "cpu_attention",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "torch": torch.__version__,
        "before_commit": resolve(args.before) if args.before else None,
        "after_commit": describe_checkout(),
        "reps": {"warm": args.reps, "cold": max(args.reps // 4, 5)},
        "block_size": BLOCK_SIZE,
        "unit": "one (sequence, KV head, 16 positions) with all its query rows",
        "load_avg": {"before": load_before, "after": load_average()},
        "load_note": LOAD_NOTE,
        "rows": arms["after"],
        "before_rows": arms.get("before"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(arms["after"], arms.get("before"), out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
