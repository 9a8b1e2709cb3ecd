"""Serving benchmark: the full stack over the OpenAI HTTP API vs the in-process engine.

The client speaks plain OpenAI HTTP (streaming /v1/completions), so it can measure any
compatible server: by default the lean client of benchmarks/sse_client.py (its CPU per
token is a fraction of httpx's, whose pool grows costly with hundreds of streams),
`--client httpx` for the general one. Prompts are token-id lists of fixed or random length;
output lengths are fixed by sending `max_tokens` with the `ignore_eos` extension. Load is
a closed-loop concurrency sweep (each of C clients sends its next request when the last
one ends) or an open-loop Poisson request rate.

The `engine` mode runs the same prompts through `engine_worker.engine.llm_engine.LLMEngine` in this
process, with the same closed loop and the same timing points (TTFT from submission to
the first token, ITL between token arrivals), so one run shows what the services add.

    python benchmarks/serving_bench.py                  # demo model: engine, then stack
    python benchmarks/serving_bench.py --quick          # tiny model, seconds (smoke test)
    python benchmarks/serving_bench.py --base-url http://host:8000 --served-model NAME \\
        --modes stack --tokenizer-vocab 32000           # measure some other server

Writes benchmarks/results/serving.json and serving.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_checkpoints import PRESETS  # sibling scripts, not a package
from sse_client import EventTally, SseClient
from stack_processes import free_port, start_nats

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DEFAULT_DEMO_DIR = ROOT / ".jetserve" / "models" / "jetserve-demo"


# ---- workload ------------------------------------------------------------------------------


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def make_workload(
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab: int,
    reserved: int,
    seed: int,
) -> Workload:
    """Random token ids (no special tokens); lengths uniform in [len*(1-r), len*(1+r)]."""
    rng = random.Random(seed)

    def length(base: int) -> int:
        lo, hi = max(1, int(base * (1 - range_ratio))), max(1, int(base * (1 + range_ratio)))
        return rng.randint(lo, hi)

    prompts = [[rng.randrange(reserved, vocab) for _ in range(length(input_len))] for _ in range(n)]
    return Workload(prompts, [length(output_len) for _ in range(n)])


# ---- per-request measurements ------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    prompt_tokens: int = 0  # from the usage chunk
    cached_tokens: int = 0  # of the prompt, found in the prefix cache


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    ms = 1000.0
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "req_s": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "ttft_ms_p50": round(percentile([r.ttft for r in ok], 50) * ms, 2),
        "ttft_ms_p99": round(percentile([r.ttft for r in ok], 99) * ms, 2),
        "tpot_ms_p50": round(percentile(tpot, 50) * ms, 2),
        "tpot_ms_p99": round(percentile(tpot, 99) * ms, 2),
        "itl_ms_p50": round(percentile(itl, 50) * ms, 2),
        "itl_ms_p99": round(percentile(itl, 99) * ms, 2),
        "e2e_ms_p50": round(percentile([r.e2e for r in ok], 50) * ms, 2),
    }


# ---- the HTTP client -----------------------------------------------------------------------


def completion_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def chat_body(model: str, prompt: list[int] | str, max_tokens: int) -> dict:
    """The chat request of one user message: the prompt's text, or for token ids as many
    words (the chat template and the tokenizer make its length differ)."""
    body = completion_body(model, [], max_tokens)
    del body["prompt"]
    text = prompt if isinstance(prompt, str) else " ".join(f"w{t % 997}" for t in prompt)
    body["messages"] = [{"role": "user", "content": text}]
    return body


# --endpoint name -> (path, request body)
ENDPOINTS = {
    "completions": ("/v1/completions", completion_body),
    "chat": ("/v1/chat/completions", chat_body),
}


async def stream_completion(
    client: httpx.AsyncClient | SseClient,
    model: str,
    prompt: list[int],
    max_tokens: int,
    endpoint: str = "completions",
) -> RequestResult:
    """One streamed /v1/completions (or /v1/chat/completions) request; token times are SSE
    chunk arrival times."""
    path, make_body = ENDPOINTS[endpoint]
    body = make_body(model, prompt, max_tokens)
    res = RequestResult(ok=False, start=time.perf_counter())
    if isinstance(client, SseClient):
        return await client.stream(path, body, res)
    tally = EventTally(res)
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                res.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return res
            async for data in resp.aiter_bytes():
                if not tally.feed(data, time.perf_counter()):
                    return res
    except httpx.HTTPError as e:
        # How far the stream got tells a connection lost mid-stream from one that never
        # carried the request (a pooled connection the server had just closed).
        at = f"after {tally.chunks} chunks, {time.perf_counter() - res.start:.2f} s"
        res.error = f"{type(e).__name__} {at}: {e}"
        return res
    return tally.finish()


async def run_http(
    base_url: str,
    model: str,
    wl: Workload,
    concurrency: int,
    request_rate: float | None,
    client_kind: str = "lean",
) -> dict:
    if client_kind == "lean":
        client: httpx.AsyncClient | SseClient = SseClient(base_url)
    else:
        limits = httpx.Limits(
            max_connections=max(concurrency, 1) + 4, max_keepalive_connections=256
        )
        client = httpx.AsyncClient(
            base_url=base_url, limits=limits, timeout=httpx.Timeout(600.0, connect=10.0)
        )
    try:
        # warm-up: connections, tokenizer load, first engine steps
        await asyncio.gather(
            *(
                stream_completion(client, model, wl.prompts[i % len(wl.prompts)], 4)
                for i in range(min(concurrency, 8))
            )
        )
        results: list[RequestResult] = []
        t0 = time.perf_counter()
        if request_rate:
            rng = random.Random(1)
            tasks = []
            for p, n in zip(wl.prompts, wl.output_lens, strict=True):
                tasks.append(asyncio.create_task(stream_completion(client, model, p, n)))
                await asyncio.sleep(rng.expovariate(request_rate))
            results = list(await asyncio.gather(*tasks))
        else:
            queue = list(zip(wl.prompts, wl.output_lens, strict=True))[::-1]

            async def user() -> None:
                while queue:
                    p, n = queue.pop()
                    results.append(await stream_completion(client, model, p, n))

            await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await client.aclose()
    return summarize(results, wall)


# ---- the in-process engine -----------------------------------------------------------------


def make_engine(model_path: str, engine_kwargs: dict):
    from engine_worker.engine.config import EngineConfig
    from engine_worker.engine.llm_engine import LLMEngine
    from shared.gc_tuning import tune_gc

    engine = LLMEngine(EngineConfig(model=model_path, **engine_kwargs))
    tune_gc()  # as a worker does once started (shared/gc_tuning.py)
    return engine


def run_engine(engine, wl: Workload, concurrency: int) -> dict:
    """`_engine_loop` on a dedicated thread, as the worker runs its engine.

    (Stepping from the main thread can be many times slower on a loaded CPU: torch's
    intra-op thread pool then competes with the interpreter's main thread.)
    """
    box: dict[str, dict] = {}
    t = threading.Thread(target=lambda: box.update(r=_engine_loop(engine, wl, concurrency)))
    t.start()
    t.join()
    return box["r"]


def _engine_loop(engine, wl: Workload, concurrency: int) -> dict:
    """Closed loop over LLMEngine.step() with the same timing points as the HTTP client."""
    from shared.sampling_params import SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    # warm-up, as the HTTP run does
    for i in range(min(concurrency, 8)):
        engine.add_request(f"warm-{concurrency}-{i}", wl.prompts[i % len(wl.prompts)], params(4))
    while engine.has_unfinished_requests():
        engine.step()

    pending = list(zip(wl.prompts, wl.output_lens, strict=True))[::-1]
    active: dict[str, RequestResult] = {}
    c = concurrency
    last: dict[str, float] = {}
    done: list[RequestResult] = []
    next_id = 0
    t0 = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            p, n = pending.pop()
            rid = f"{c}-{next_id}"
            next_id += 1
            active[rid] = RequestResult(ok=False, start=time.perf_counter())
            engine.add_request(rid, p, params(n))
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            r = active.get(out.request_id)
            if r is None:
                continue
            new = sum(len(d.token_ids) for d in out.deltas)
            if new:
                if r.output_tokens == 0:
                    r.ttft = now - r.start
                else:
                    r.itl.append(now - last[out.request_id])
                last[out.request_id] = now
                r.output_tokens += new
            if out.finished:
                r.e2e = now - r.start
                r.ok = r.output_tokens > 0
                done.append(r)
                del active[out.request_id]
                last.pop(out.request_id, None)
    return summarize(done, time.perf_counter() - t0)


# ---- launching the stack -------------------------------------------------------------------


def process_cpu_s(pid: int | None) -> float:
    """User+system CPU seconds of a process (Linux /proc); this process when pid is None."""
    if pid is None:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextmanager
def launched_stack(
    model_path: str, served_name: str, worker_args: list[str], worker_env: dict[str, str]
):
    """nats-server + one worker + the API as subprocesses; yields the API base URL."""
    tmp = Path(tempfile.mkdtemp(prefix="jetserve-bench-"))
    api_port = free_port()
    env = {**os.environ, "JETSERVE_LOG_LEVEL": "warning", "TOKENIZERS_PARALLELISM": "false"}
    env["JETSERVE_AUTH"] = "0"  # measure serving, not the gateway (API keys are on by default)
    cli = [sys.executable, "-m", "services.cli"]
    logs = {name: open(tmp / f"{name}.log", "w") for name in ("worker", "api")}
    nats, nats_url = start_nats(tmp)
    procs = [nats]
    try:
        procs.append(
            subprocess.Popen(
                [
                    *cli,
                    "worker",
                    "--model",
                    model_path,
                    "--model-name",
                    served_name,
                    "--nats-url",
                    nats_url,
                    "--metrics-port",
                    "0",
                    *worker_args,
                ],
                cwd=ROOT,
                env=env,
                stdout=logs["worker"],
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    *cli,
                    "api",
                    "--nats-url",
                    nats_url,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                ],
                cwd=ROOT,
                env=env,
                stdout=logs["api"],
                stderr=subprocess.STDOUT,
            )
        )
        base = f"http://127.0.0.1:{api_port}"
        wait_ready(f"{base}/ready", timeout=180)
        yield base, {"nats": procs[0].pid, "worker": procs[1].pid, "api": procs[2].pid}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- model and report ----------------------------------------------------------------------


def resolve_model(args: argparse.Namespace) -> tuple[str, int, int]:
    """(path, vocab size, first non-special id) of the model to serve."""
    if args.quick and not args.model:
        sys.path.insert(0, str(ROOT))
        from tests.support.model_factory import build_tiny_checkpoint

        path = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="jetserve-tiny-")), seed=0)
    elif args.model:
        path = Path(args.model)
    else:
        path = Path(os.environ.get("JETSERVE_DEMO_MODEL_DIR") or DEFAULT_DEMO_DIR)
        preset = getattr(args, "model_preset", None)
        if preset:
            from serving_checkpoints import build_preset

            path = build_preset(preset, path, path.parent / f"bench-{preset}")
        elif not (path / "config.json").is_file():
            from engine_worker.demo.checkpoint import ensure_demo_checkpoint

            path = ensure_demo_checkpoint(path)
    cfg = json.loads((path / "config.json").read_text())
    tok_cfg = path / "tokenizer.json"
    reserved = 0
    if tok_cfg.is_file():
        added = json.loads(tok_cfg.read_text()).get("added_tokens") or []
        reserved = max((t["id"] for t in added if t.get("special")), default=-1) + 1
    return str(path), int(cfg["vocab_size"]), reserved


def _display_path(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def compare(results: list[dict]) -> list[dict]:
    by = {(r["mode"], r["concurrency"]): r for r in results}
    out = []
    for (mode, c), stack in sorted(by.items(), key=lambda kv: kv[0][1]):
        eng = by.get(("engine", c))
        if mode != "stack" or eng is None:
            continue
        out.append(
            {
                "concurrency": c,
                "throughput_ratio": round(stack["output_tok_s"] / eng["output_tok_s"], 3),
                "added_ttft_ms_p50": round(stack["ttft_ms_p50"] - eng["ttft_ms_p50"], 2),
                "added_tpot_ms_p50": round(stack["tpot_ms_p50"] - eng["tpot_ms_p50"], 2),
            }
        )
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, style, color in (("engine", "o--", "tab:blue"), ("stack", "s-", "tab:orange")):
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["concurrency"])
        if not rows:
            continue
        xs = [r["concurrency"] for r in rows]
        axes[0].plot(xs, [r["output_tok_s"] for r in rows], style, color=color, label=mode)
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(xs, [r[f"{key}_ms_p50"] for r in rows], style, color=color,
                    label=f"{mode} p50")  # fmt: skip
            ax.plot(xs, [r[f"{key}_ms_p99"] for r in rows], style, color=color, alpha=0.35,
                    label=f"{mode} p99")  # fmt: skip
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    for ax, ylabel in zip(
        axes, ("output tokens/s", "TTFT (ms)", "inter-token latency (ms)"), strict=True
    ):
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model folder (default: the demo model)")
    p.add_argument(
        "--model-preset",
        choices=sorted(PRESETS),
        help="a random Llama of this size with the demo tokenizer, built once "
        "(benchmarks/serving_checkpoints.py)",
    )
    p.add_argument("--served-model", help="model name on the server (default: folder name)")
    p.add_argument("--base-url", help="measure this running server instead of launching one")
    p.add_argument("--modes", default="engine,stack", help="engine, stack, or both")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated sweep")
    p.add_argument("--request-rate", type=float, help="Poisson req/s instead of a closed loop")
    p.add_argument("--num-prompts", type=int, default=0, help="per point (default 4x conc, >=16)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="0: fixed lengths")
    p.add_argument("--tokenizer-vocab", type=int, help="vocab size when --base-url has no --model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-memory", type=int, default=512 * 1024 * 1024)
    p.add_argument(
        "--worker-threads", type=int, help="torch threads of the worker (OMP_NUM_THREADS)"
    )
    p.add_argument("--engine-threads", type=int, help="torch threads of the engine mode")
    p.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="lean: benchmarks/sse_client.py (O(1) pool, little CPU); httpx: general client",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, short sweep (smoke test)")
    p.add_argument("--out", default=str(RESULTS / "serving.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.concurrency = "1,4"
        args.input_len, args.output_len = 16, 8
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sweep = [int(c) for c in args.concurrency.split(",")]
    if args.base_url and not args.model:
        if not args.tokenizer_vocab or not args.served_model:
            raise SystemExit(
                "--base-url without --model needs --served-model and --tokenizer-vocab"
            )
        model_path, vocab, reserved = None, args.tokenizer_vocab, 16
        modes = [m for m in modes if m != "engine"]
    else:
        model_path, vocab, reserved = resolve_model(args)
    served = args.served_model or (Path(model_path).name if model_path else "model")
    engine_kwargs = {"max_num_seqs": args.max_num_seqs, "kv_cache_memory": args.kv_cache_memory}
    worker_args = [
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--kv-cache-memory",
        str(args.kv_cache_memory),
    ]

    def workload(c: int) -> Workload:
        n = args.num_prompts or max(16, 4 * c)
        return make_workload(
            n, args.input_len, args.output_len, args.range_ratio, vocab, reserved, args.seed + c
        )

    results: list[dict] = []

    def record(mode: str, c: int, summary: dict) -> None:
        # The machine may be shared: each point says how loaded it was when it ended.
        row = {"mode": mode, "concurrency": c, "load_avg_1m": round(os.getloadavg()[0], 2)}
        row.update(summary)
        results.append(row)
        print(
            f"{mode:>6} c={c:<3} {summary['output_tok_s']:>9.1f} tok/s  "
            f"{summary['req_s']:>7.2f} req/s  TTFT p50 {summary['ttft_ms_p50']:>8.2f} ms  "
            f"p99 {summary['ttft_ms_p99']:>8.2f}  TPOT p50 {summary['tpot_ms_p50']:>7.2f}  "
            f"ITL p50 {summary['itl_ms_p50']:>7.2f} p99 {summary['itl_ms_p99']:>7.2f}"
            f"{'  FAILED ' + str(summary['failed']) if summary['failed'] else ''}",
            flush=True,
        )

    def run_stack(base: str, c: int, pids: dict[str, int | None]) -> None:
        """One stack point; with launched processes, also where the CPU went per token."""
        before = {name: process_cpu_s(pid) for name, pid in pids.items()}
        summary = asyncio.run(
            run_http(base, served, workload(c), c, args.request_rate, args.client)
        )
        if pids and summary["output_tokens"]:
            summary["cpu_us_per_token"] = {
                name: round(1e6 * (process_cpu_s(pid) - before[name]) / summary["output_tokens"])
                for name, pid in pids.items()
            }
        record("stack", c, summary)

    # Engine and stack points alternate per concurrency so both see the same machine load
    # (the idle stack costs nothing while the engine runs).
    if args.engine_threads:
        import torch

        torch.set_num_threads(args.engine_threads)
    engine = make_engine(model_path, engine_kwargs) if "engine" in modes and model_path else None
    if "stack" in modes and not args.base_url:
        assert model_path is not None
        worker_env = {}
        if args.worker_threads:
            worker_env["OMP_NUM_THREADS"] = str(args.worker_threads)
        with launched_stack(model_path, served, worker_args, worker_env) as (base, pids):
            for c in sweep:
                if engine is not None:
                    record("engine", c, run_engine(engine, workload(c), c))
                run_stack(base, c, {**pids, "client": None})
    else:
        for c in sweep:
            if engine is not None:
                record("engine", c, run_engine(engine, workload(c), c))
            if "stack" in modes:
                run_stack(args.base_url, c, {})

    report = {
        "benchmark": "serving",
        "machine": machine(),
        "model": {"path": _display_path(model_path), "served_name": served, "vocab_size": vocab},
        "workload": {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "range_ratio": args.range_ratio,
            "request_rate": args.request_rate,
            "max_num_seqs": args.max_num_seqs,
            "kv_cache_memory": args.kv_cache_memory,
            "sampling": "greedy, ignore_eos",
        },
        "results": results,
        "stack_vs_engine": compare(results),
        "targets": {"throughput_ratio_at_32": ">= 0.90", "added_ttft_ms_p50": "<= 5"},
        "note": "stack = nats-server + API + worker + this client on the same machine; "
        "cpu_us_per_token: CPU time of each process per output token at that point",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    title = (
        f"jetserve serving: {served}, in {args.input_len} / out {args.output_len} tokens, "
        f"{report['machine']['gpu'] or str(report['machine']['cpu_count']) + '-core CPU'}"
    )
    plot(results, out.with_suffix(".png"), title)
    for row in report["stack_vs_engine"]:
        print(
            f"c={row['concurrency']:<3} stack/engine throughput {row['throughput_ratio']:.3f}  "
            f"added TTFT p50 {row['added_ttft_ms_p50']:+.2f} ms"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
