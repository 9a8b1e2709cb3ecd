"""GPU decode benchmark: a Llama-3-8B-shaped model with random bf16 weights on the engine.

Measures, on one CUDA device:
- copy bandwidth (torch copy of a large buffer; read + write bytes / time): the roofline;
- engine output tokens/s with 1, 16, 64, 256 concurrent sequences (input 512, output 256,
  greedy, EOS ignored; all requests submitted at once);
- batch-1 decode step time against the roofline: bytes of weights a decode step reads
  (every parameter but the embedding table, of which a step reads one row per token)
  divided by the copy bandwidth. Target: roofline / measured >= 0.8;
- the Triton paged-attention kernel alone on long-context decodes: KV bytes read / time,
  next to the torch reference.

No checkpoint is needed: the script writes an 8B ``config.json`` into a temporary folder
and the engine fills the model with random weights (``load_format="dummy"``).

    python benchmarks/gpu_decode_bench.py              # GPU: benchmarks/results/gpu_decode_bench.{json,png}
    python benchmarks/gpu_decode_bench.py --dry-run    # CPU, tiny shapes, seconds: checks the script runs

(On a host with CUDA, the dry run needs TRITON_INTERPRET=1 for its CPU kernels.)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from jetserve_kernels.paged_attention import paged_attention_ref, paged_attention_triton
from shared.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results"

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
TINY = {
    **LLAMA3_8B,
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}


@dataclass
class Setup:
    """Everything that differs between the real run and the CPU dry run."""

    device: torch.device
    dtype: torch.dtype
    model_config: dict
    concurrency: list[int]
    input_len: int
    output_len: int
    copy_bytes: int
    attention_cases: list[tuple[int, int]]  # (decodes, context length)
    attention_heads: tuple[int, int, int]  # (q heads, kv heads, head dim)
    attention_backend: str
    cuda_graphs: bool


def make_setup(args: argparse.Namespace) -> Setup:
    if args.dry_run:
        return Setup(
            device=torch.device("cpu"),
            dtype=torch.float32,
            model_config=TINY,
            concurrency=[1, 2, 4],
            input_len=16,
            output_len=8,
            copy_bytes=16 << 20,
            attention_cases=[(1, 256), (2, 96)],
            attention_heads=(4, 2, 64),
            attention_backend=args.attention_backend or "torch",
            cuda_graphs=False,
        )
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on the CPU")
    return Setup(
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        model_config=LLAMA3_8B,
        concurrency=args.concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        copy_bytes=args.copy_gib << 30,
        attention_cases=[(1, 32768), (16, 16384), (64, 4096)],
        attention_heads=(32, 8, 128),
        attention_backend=args.attention_backend or "triton",
        cuda_graphs=not args.no_cuda_graphs,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call (CUDA events on the GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(setup: Setup) -> dict:
    """Device-memory bandwidth a plain copy reaches: the practical roofline for decode."""
    n = setup.copy_bytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=setup.device).normal_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), setup.device, iters=20)
    moved = 2 * n * 2  # read + write
    return {"buffer_bytes": n * 2, "seconds": seconds, "gb_per_s": moved / seconds / 1e9}


def build_engine(setup: Setup, folder: Path, max_num_seqs: int) -> LLMEngine:
    (folder / "config.json").write_text(json.dumps(setup.model_config))
    max_len = setup.input_len + setup.output_len + 16
    config = EngineConfig(
        model=str(folder),
        dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[setup.dtype],
        device=setup.device.type,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(2048, setup.input_len),
        max_model_len=max_len,
        enable_prefix_caching=False,  # random prompts never hit; keep hashing out of the numbers
        attention_backend=setup.attention_backend,
        cuda_graphs=setup.cuda_graphs,
        num_kv_blocks=None if setup.device.type == "cuda" else 4 * max_num_seqs * max_len // 16,
    )
    return LLMEngine(config, load_format="dummy")


def decode_weight_bytes(engine: LLMEngine) -> int:
    """Bytes of parameters one decode step streams from memory (all but the embedding table)."""
    model = engine.runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        total -= model.embed.numel() * model.embed.element_size()
    return total


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


def run_concurrency(engine: LLMEngine, setup: Setup, concurrency: int, seed: int) -> dict:
    """All requests at once; output tok/s over the whole run, and over the decode-only tail."""
    vocab = setup.model_config["vocab_size"]
    params = SamplingParams(max_tokens=setup.output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(concurrency, setup.input_len, vocab, seed)):
        engine.add_request(f"c{concurrency}-{i}", prompt, params)
    produced, started = 0, set()
    sync(setup.device)
    t0 = time.perf_counter()
    t_all_started = None
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            n = sum(len(d.token_ids) for d in out.deltas)
            produced += n
            if n:
                started.add(out.request_id)
        steps += 1
        if t_all_started is None and len(started) == concurrency:
            sync(setup.device)
            t_all_started = time.perf_counter()
    sync(setup.device)
    elapsed = time.perf_counter() - t0
    expected = concurrency * setup.output_len
    assert produced == expected, (produced, expected)
    decode_seconds = time.perf_counter() - t_all_started if t_all_started else 0.0
    decode_tokens = concurrency * (setup.output_len - 1)
    return {
        "concurrency": concurrency,
        "output_tokens": produced,
        "seconds": elapsed,
        "steps": steps,
        "output_tok_per_s": produced / elapsed,
        "decode_tok_per_s": decode_tokens / decode_seconds if decode_seconds else None,
    }


def batch1_decode_steps(engine: LLMEngine, setup: Setup, seed: int) -> dict:
    """Wall time of each engine step of one sequence after its prefill (median)."""
    vocab = setup.model_config["vocab_size"]
    prompt = random_prompts(1, setup.input_len, vocab, seed)[0]
    params = SamplingParams(max_tokens=setup.output_len, temperature=0.0, ignore_eos=True)
    engine.add_request("batch1", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        sync(setup.device)
        t0 = time.perf_counter()
        engine.step()
        sync(setup.device)
        times.append(time.perf_counter() - t0)
    decode = times[1:]  # the first step is the prefill
    return {
        "steps": len(decode),
        "median_s": statistics.median(decode),
        "p10_s": sorted(decode)[len(decode) // 10],
        "p90_s": sorted(decode)[(9 * len(decode)) // 10],
    }


def attention_bandwidth(setup: Setup, decodes: int, context: int, block_size: int = 16) -> dict:
    """The paged-attention kernel alone on a decode batch: KV bytes read per second."""
    hq, hkv, d = setup.attention_heads
    g = torch.Generator(device="cpu").manual_seed(context + decodes)
    blocks_per_seq = -(-context // block_size)
    num_blocks = decodes * blocks_per_seq
    dev, dtype = setup.device, setup.dtype
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=dev)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=dev)
    tables = torch.randperm(num_blocks, generator=g).view(decodes, blocks_per_seq)
    block_tables = tables.to(torch.int32).to(dev)
    query = torch.randn(decodes, hq, d, dtype=dtype, device=dev)
    query_start_loc = torch.arange(decodes + 1, dtype=torch.int32, device=dev)
    seq_lens = torch.full((decodes,), context, dtype=torch.int32, device=dev)
    lens = [context] * decodes
    scale = d**-0.5
    args = (query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, decodes)

    def triton_call() -> torch.Tensor:
        return paged_attention_triton(*args, [1] * decodes, lens)

    def ref_call() -> torch.Tensor:
        return paged_attention_ref(*args, [1] * decodes, lens)

    iters = 20 if dev.type == "cuda" else 1
    out, ref = triton_call(), ref_call()
    max_err = (out.float() - ref.float()).abs().max().item()
    t_triton = time_call(triton_call, dev, iters=iters, warmup=2 if dev.type == "cuda" else 0)
    t_ref = time_call(ref_call, dev, iters=iters, warmup=2 if dev.type == "cuda" else 0)
    kv_bytes = 2 * decodes * context * hkv * d * k_cache.element_size()
    return {
        "decodes": decodes,
        "context": context,
        "heads": {"q": hq, "kv": hkv, "dim": d},
        "kv_bytes": kv_bytes,
        "triton_s": t_triton,
        "triton_gb_per_s": kv_bytes / t_triton / 1e9,
        "reference_s": t_ref,
        "reference_gb_per_s": kv_bytes / t_ref / 1e9,
        "max_abs_err_vs_reference": max_err,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU (dry run)"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    runs = results["throughput"]
    labels = [str(r["concurrency"]) for r in runs]
    values = [r["output_tok_per_s"] for r in runs]
    ax1.bar(labels, values, color="tab:blue")
    for i, v in enumerate(values):
        ax1.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax1.set_xlabel("concurrent sequences")
    ax1.set_ylabel("output tokens/s")
    ax1.set_title(
        f"{results['model']['name']}, in {results['input_len']} / out {results['output_len']}"
    )

    b1 = results["batch1_decode"]
    bars = {"roofline": b1["roofline_s"] * 1e3, "measured": b1["median_s"] * 1e3}
    ax2.bar(list(bars), list(bars.values()), color=["tab:gray", "tab:blue"])
    ax2.set_ylabel("ms per decode step")
    ax2.set_title(
        f"batch-1 decode: {100 * b1['fraction_of_roofline']:.0f}% of roofline (target 80%)"
    )

    att = results["attention_kernel"]
    names = [f"{a['decodes']}x{a['context']}" for a in att]
    x = range(len(att))
    ax3.bar([i - 0.2 for i in x], [a["triton_gb_per_s"] for a in att], 0.4, label="Triton")
    ax3.bar([i + 0.2 for i in x], [a["reference_gb_per_s"] for a in att], 0.4, label="torch ref")
    ax3.axhline(results["copy_bandwidth"]["gb_per_s"], color="tab:gray", ls="--", label="copy")
    ax3.set_xticks(list(x), names)
    ax3.set_xlabel("decodes x context")
    ax3.set_ylabel("KV GB/s")
    ax3.set_title("paged attention, long-context decode")
    ax3.legend()
    fig.suptitle(results["device"])
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--copy-gib", type=int, default=2)
    ap.add_argument("--attention-backend", choices=["torch", "triton"], default=None)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    setup = make_setup(args)
    name = "gpu_decode_bench_dry" if args.dry_run else "gpu_decode_bench"
    out = args.out or RESULTS / f"{name}.json"

    results: dict = {
        "device": device_name(setup.device),
        "dtype": str(setup.dtype).removeprefix("torch."),
        "attention_backend": setup.attention_backend,
        "cuda_graphs": setup.cuda_graphs,
        "input_len": setup.input_len,
        "output_len": setup.output_len,
        "torch": torch.__version__,
    }
    results["copy_bandwidth"] = copy_bandwidth(setup)
    print("copy", results["copy_bandwidth"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(setup, Path(tmp), max(setup.concurrency))
        weight_bytes = decode_weight_bytes(engine)
        params = sum(p.numel() for p in engine.runner.model.parameters())
        results["model"] = {
            "name": "Llama-3-8B shape, random weights" if not args.dry_run else "tiny Llama",
            "params": params,
            "decode_weight_bytes": weight_bytes,
            "config": setup.model_config,
        }
        # Warm-up: Triton compiles every kernel variant (prefill, decode, split-K) it meets.
        run_concurrency(engine, setup, min(4, max(setup.concurrency)), seed=99)
        b1 = batch1_decode_steps(engine, setup, seed=7)
        roofline = weight_bytes / (results["copy_bandwidth"]["gb_per_s"] * 1e9)
        b1["roofline_s"] = roofline
        b1["fraction_of_roofline"] = roofline / b1["median_s"]
        results["batch1_decode"] = b1
        print("batch-1 decode", b1, flush=True)
        results["throughput"] = []
        for c in setup.concurrency:
            r = run_concurrency(engine, setup, c, seed=c)
            print("throughput", r, flush=True)
            results["throughput"].append(r)
        del engine
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()

    results["attention_kernel"] = []
    for decodes, context in setup.attention_cases:
        a = attention_bandwidth(setup, decodes, context)
        a["fraction_of_copy_bandwidth"] = (
            a["triton_gb_per_s"] / results["copy_bandwidth"]["gb_per_s"]
        )
        print("attention", a, flush=True)
        results["attention_kernel"].append(a)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    print(
        f"batch-1 decode {1e3 * b1['median_s']:.2f} ms vs roofline {1e3 * roofline:.2f} ms "
        f"({100 * b1['fraction_of_roofline']:.0f}%, target 80%)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
