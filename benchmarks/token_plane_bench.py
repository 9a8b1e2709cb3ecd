"""Token-plane benchmark: the full stack at GPU rates, on simulated GPUs.

Workers run the simulated device (`--load-format simulated`, a roofline clock for
Llama-3.1-8B on an H100 by default: the real scheduler and bookkeeping, no model), so
the engine produces tokens as fast as a GPU would while using almost no CPU; whatever
CPU and latency the run costs beyond that is the token plane: worker publishing,
nats-server, API (decode, detokenize, stop strings, SSE) and the client.

For each point it runs the same closed loop twice: through the simulated engine in
this process (the engine's own tok/s, TTFT, ITL, host overhead), then through 1-2 API
replicas, nats-server and 1-4 simulated workers, with an OpenAI streaming client
(`/v1/completions`, stream=True, or `--endpoint chat`; `--client openai` uses the OpenAI SDK itself,
`--client httpx` httpx, the default the lean client of benchmarks/sse_client.py so the
client's own CPU disturbs the stack less: httpx's pool checks every connection on each
request, which at 256 streams delayed a burst of requests by seconds). It
reports per process the CPU microseconds per output token (/proc), stack tok/s vs the
engine's, TTFT and ITL p50/p99 added by the stack, and the workers' step-period
inflation (wall time between engine steps vs the simulated device time of the steps,
from the simulated device's own log).

    python benchmarks/token_plane_bench.py                       # 1 and 256 concurrent
    python benchmarks/token_plane_bench.py --workers 2 --apis 2 --concurrency 512
    python benchmarks/token_plane_bench.py --quick               # seconds, smoke test

Writes benchmarks/results/token_plane.json (`--out`) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench as sb  # sibling scripts, not a package
import stack_processes as sp

from shared.tokenizer import TokenizerBundle, load_tokenizer

ROOT = sb.ROOT
RESULTS = sb.RESULTS


# ---- the simulated engine alone ------------------------------------------------------------


def engine_point(
    model: str,
    profile: str,
    max_num_seqs: int,
    wl: sb.Workload,
    c: int,
    async_scheduling: str = "auto",
) -> dict:
    """The closed loop through the simulated engine in this process (its own thread)."""
    from engine_worker.engine.config import EngineConfig
    from engine_worker.engine.factory import build_engine
    from shared.gc_tuning import tune_gc
    from shared.tokenizer import load_tokenizer

    engine = build_engine(
        EngineConfig(
            model=model,
            load_format="simulated",
            simulate_profile=profile,
            max_num_seqs=max_num_seqs,
            async_scheduling=async_scheduling,
        )
    )
    with contextlib.suppress(ValueError):
        engine.eos_token_ids |= load_tokenizer(model).eos_token_ids  # as the worker does
    tune_gc()  # as the worker tunes its collector once started (shared/gc_tuning.py)
    cpu0 = sb.process_cpu_s(None)
    summary = sb.run_engine(engine, wl, c)
    cpu = sb.process_cpu_s(None) - cpu0
    stats = engine.device_stats
    summary["engine_host_cpu_us_per_token"] = round(1e6 * cpu / max(summary["output_tokens"], 1), 1)
    summary["step_inflation"] = round(stats.inflation, 4)
    return summary


# ---- the stack -----------------------------------------------------------------------------


class Stack:
    """nats-server, simulated workers and API replicas as subprocesses."""

    def __init__(
        self,
        model: str,
        served: str,
        profile: str,
        workers: int,
        apis: int,
        seqs: int,
        worker_flags: tuple[str, ...] = (),
    ):
        self.tmp = Path(tempfile.mkdtemp(prefix="jetserve-tokenplane-"))
        self.model, self.served, self.profile = model, served, profile
        self.num_workers, self.num_apis, self.seqs = workers, apis, seqs
        self.worker_flags = worker_flags
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.api_urls: list[str] = []

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.logs[name] = self.tmp / f"{name}.log"
        self.procs[name] = sp.spawn(self.logs[name], argv, env)

    def start(self) -> None:
        self.procs["nats"], url = sp.start_nats(self.tmp)
        self.logs["nats"] = self.tmp / "nats.log"
        env = sp.service_env()  # no API keys: measure the token plane, not the gateway
        cli = [sys.executable, "-m", "services.cli"]
        for i in range(self.num_workers):
            worker_env = {**env, "JETSERVE_LOG_LEVEL": "info"}  # the device's stats lines
            self._spawn(
                f"worker{i}",
                [*cli, "worker", "--model", self.model, "--model-name", self.served,
                 "--nats-url", url, "--metrics-port", "0", "--worker-id", f"bench-w{i}",
                 "--load-format", "simulated", "--simulate-profile", self.profile,
                 "--max-num-seqs", str(self.seqs), *self.worker_flags],
                worker_env,
            )  # fmt: skip
        for i in range(self.num_apis):
            port = sb.free_port()
            self._spawn(
                f"api{i}",
                [*cli, "api", "--nats-url", url, "--host", "127.0.0.1", "--port", str(port)],
                env,
            )
            self.api_urls.append(f"http://127.0.0.1:{port}")
        for base in self.api_urls:
            sb.wait_ready(f"{base}/ready", timeout=180)
        self._wait_workers()

    def _wait_workers(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("worker_ready" in self.logs[n].read_text() for n in self.worker_names):
                return
            time.sleep(0.2)
        raise TimeoutError("workers not ready")

    @property
    def worker_names(self) -> list[str]:
        return [f"worker{i}" for i in range(self.num_workers)]

    def pids(self) -> dict[str, int]:
        """Every process of the stack by name; a worker's engine process (--engine-process)
        as `engine<i>`, so the worker's own CPU is its token plane."""
        out = {name: p.pid for name, p in self.procs.items()}
        for name in self.worker_names:
            for j, child in enumerate(child_pids(self.procs[name].pid)):
                out[f"engine{name[len('worker') :]}" + (f"-{j}" if j else "")] = child
        return out

    def device_stats(self) -> dict[str, dict]:
        """The latest `simulated_device` line of each worker's log."""
        return {name: sp.last_device_stats(self.logs[name]) for name in self.worker_names}

    def stop(self) -> None:
        sp.stop_processes(self.procs)
        shutil.rmtree(self.tmp, ignore_errors=True)


async def openai_sdk_completion(client, model: str, prompt: list[int], n: int) -> sb.RequestResult:
    """One streamed completion through the OpenAI SDK (its parsing CPU counts as client)."""
    res = sb.RequestResult(ok=False, start=time.perf_counter())
    last = res.start
    chunks = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=n, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            now = time.perf_counter()
            if not chunk.choices:
                res.output_tokens = chunk.usage.completion_tokens if chunk.usage else 0
                continue
            if chunks == 0:
                res.ttft = now - res.start
            else:
                res.itl.append(now - last)
            chunks += 1
            last = now
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - res.start
    res.output_tokens = res.output_tokens or chunks
    res.ok = chunks > 0
    return res


async def client_run(
    urls: list[str], model: str, wl: sb.Workload, c: int, kind: str, endpoint: str = "completions"
) -> dict:
    """Closed loop of `c` users; user i talks to API replica i mod len(urls)."""
    limits = httpx.Limits(max_connections=c + 8, max_keepalive_connections=c + 8)
    timeout = httpx.Timeout(600.0, connect=10.0)
    if kind == "openai":
        from openai import AsyncOpenAI

        clients = [
            AsyncOpenAI(base_url=f"{u}/v1", api_key="bench", max_retries=0,
                        http_client=httpx.AsyncClient(limits=limits, timeout=timeout))
            for u in urls
        ]  # fmt: skip

        def one(i: int, p: list[int], n: int):
            return openai_sdk_completion(clients[i % len(clients)], model, p, n)
    elif kind == "httpx":
        clients = [httpx.AsyncClient(base_url=u, limits=limits, timeout=timeout) for u in urls]

        def one(i: int, p: list[int], n: int):
            return sb.stream_completion(clients[i % len(clients)], model, p, n, endpoint)
    else:
        clients = [sb.SseClient(u) for u in urls]

        def one(i: int, p: list[int], n: int):
            return sb.stream_completion(clients[i % len(clients)], model, p, n, endpoint)

    try:
        await asyncio.gather(*(one(i, wl.prompts[i], 4) for i in range(min(c, 8))))  # warm-up
        queue = list(zip(wl.prompts, wl.output_lens, strict=True))[::-1]
        results: list[sb.RequestResult] = []

        async def user(i: int) -> None:
            while queue:
                p, n = queue.pop()
                results.append(await one(i, p, n))

        t0 = time.perf_counter()
        await asyncio.gather(*(user(i) for i in range(c)))
        return sb.summarize(results, time.perf_counter() - t0)
    finally:
        for cl in clients:
            await (cl.close() if kind == "openai" else cl.aclose())


def chat_texts(tok: TokenizerBundle, wl: sb.Workload) -> sb.Workload:
    """Each prompt's text, sent as one user message by `--endpoint chat`."""
    return sb.Workload([tok.decode(p) for p in wl.prompts], wl.output_lens)  # type: ignore[arg-type]


def chat_ids(tok: TokenizerBundle, texts: sb.Workload) -> sb.Workload:
    """The token ids the API makes of each text's chat request (template included), so
    that the engine alone runs the prompts the stack's engines get."""
    ids = [tok.encode_chat(sb.chat_body("", t, 1)["messages"]) for t in texts.prompts]
    return sb.Workload(ids, texts.output_lens)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc), empty when it has none."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(x) for x in (task / "children").read_text().split()]
    return out


def stack_point(
    stack: Stack, wl: sb.Workload, c: int, kind: str, endpoint: str = "completions"
) -> dict:
    pids = stack.pids()
    stats0 = stack.device_stats()
    before = {name: sb.process_cpu_s(pid) for name, pid in pids.items()}
    client0 = sb.process_cpu_s(None)
    summary = asyncio.run(client_run(stack.api_urls, stack.served, wl, c, kind, endpoint))
    time.sleep(sb_stats_wait())  # one more periodic device line covers the end of the run
    tokens = max(summary["output_tokens"], 1)
    cpu = {name: (sb.process_cpu_s(pid) - before[name]) for name, pid in pids.items()}
    cpu["client"] = sb.process_cpu_s(None) - client0
    summary["cpu_us_per_token"] = {k: round(1e6 * v / tokens, 1) for k, v in cpu.items()}
    summary["cpu_us_per_token_by_role"] = {
        role: round(1e6 * sum(v for k, v in cpu.items() if k.startswith(role)) / tokens, 1)
        for role in ("api", "worker", "engine", "nats", "client")
    }
    summary["step_inflation"] = _inflation(stats0, stack.device_stats())
    return summary


def sb_stats_wait() -> float:
    from engine_worker.engine.simulated.engine import STATS_LOG_INTERVAL_S

    return STATS_LOG_INTERVAL_S + 0.3


def _inflation(before: dict[str, dict], after: dict[str, dict]) -> float | None:
    """Busy wall period over busy device time, minus one, across workers, for the run."""
    period = sum(
        a.get("busy_period_s", 0) - before[n].get("busy_period_s", 0) for n, a in after.items()
    )
    device = sum(
        a.get("busy_device_s", 0) - before[n].get("busy_device_s", 0) for n, a in after.items()
    )
    return round(period / device - 1, 4) if device > 0 else None


# ---- report --------------------------------------------------------------------------------


def compare(engine: dict, stack: dict, workers: int) -> dict:
    """Stack vs `workers` simulated engines, each as fast as the in-process one."""
    eng_cpu = engine["engine_host_cpu_us_per_token"]
    roles = stack["cpu_us_per_token_by_role"]
    worker_cpu = roles["worker"]
    # With the engine in its own process the worker process is the token plane (NATS,
    # Deltas); with the engine in a thread, the engine's own host CPU is taken off.
    plane = worker_cpu if roles.get("engine") else worker_cpu - eng_cpu
    return {
        "throughput_ratio": round(stack["output_tok_s"] / (engine["output_tok_s"] * workers), 3),
        "added_ttft_ms_p50": round(stack["ttft_ms_p50"] - engine["ttft_ms_p50"], 2),
        "added_ttft_ms_p99": round(stack["ttft_ms_p99"] - engine["ttft_ms_p99"], 2),
        "added_itl_ms_p50": round(stack["itl_ms_p50"] - engine["itl_ms_p50"], 2),
        "added_itl_ms_p99": round(stack["itl_ms_p99"] - engine["itl_ms_p99"], 2),
        # The worker's CPU beyond what the engine spends per token: its token plane (one
        # Delta per token in decode, so per token ~ per delta).
        "worker_token_plane_cpu_us_per_token": round(plane, 1),
        "step_inflation_stack": stack["step_inflation"],
        "step_inflation_engine_alone": engine["step_inflation"],
    }


def plot(report: dict, path: Path, before: dict | None = None) -> None:
    """CPU per token by role, and throughput ratio, for this run (and a before run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("before", before), ("after", report)] if before else [("this run", report)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    roles = ("engine", "worker", "nats", "api", "client")
    points = [(label, p) for label, r in runs for p in r["points"]]
    xs = range(len(points))
    bottom = [0.0] * len(points)
    for role in roles:
        vals = [p["stack"]["cpu_us_per_token_by_role"].get(role, 0.0) for _, p in points]
        axes[0].bar(xs, vals, bottom=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    names = [f"{label}\nc={p['concurrency']} w={p['workers']} a={p['apis']}" for label, p in points]
    axes[0].set_xticks(list(xs), names, fontsize=7)
    axes[0].set_ylabel("CPU us per output token")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3, axis="y")
    axes[1].bar(xs, [p["compare"]["throughput_ratio"] for _, p in points], color="tab:green")
    axes[1].axhline(0.95, color="k", ls="--", lw=0.8)
    axes[1].set_xticks(list(xs), names, fontsize=7)
    axes[1].set_ylabel("stack tok/s / simulated engine tok/s")
    axes[1].grid(alpha=0.3, axis="y")
    m = report["machine"]
    fig.suptitle(
        f"jetserve token plane, simulated {report['profile']}, in {report['workload']['input_len']}"
        f" / out {report['workload']['output_len']}, {m['cpu_count']}-core CPU", fontsize=10,
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The model and workload options `report_head` records (this bench's and
    engine_process_bench's)."""
    p.add_argument("--model", help="tokenizer source (default: the demo model)")
    p.add_argument("--profile", default="h100-llama3-8b")
    p.add_argument("--requests-per-user", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--workers", default="1", help="comma-separated: worker counts to sweep")
    p.add_argument("--apis", default="1", help="comma-separated: API replica counts to sweep")
    p.add_argument("--concurrency", default="1,256", help="comma-separated, per worker")
    p.add_argument(
        "--client",
        choices=("lean", "httpx", "openai"),
        default="lean",
        help="lean: benchmarks/sse_client.py; httpx: its pool costs O(streams) a request",
    )
    p.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="chat: /v1/chat/completions, each prompt's text as one user message",
    )
    p.add_argument(
        "--worker-flags", default="", help='extra worker flags, e.g. "--engine-process on"'
    )
    p.add_argument(
        "--async-scheduling",
        choices=("auto", "on", "off"),
        default="auto",
        help="the engine's (alone and in the workers); auto is on for the simulated device",
    )
    p.add_argument("--quick", action="store_true", help="tiny workload, smoke test")
    p.add_argument("--compare-with", help="a before-JSON to plot beside this run")
    p.add_argument("--out", default=str(RESULTS / "token_plane.json"))
    args = p.parse_args(argv)
    if args.endpoint == "chat" and args.client == "openai":
        p.error("--endpoint chat takes the lean or the httpx client")
    return args


def report_head(
    benchmark: str, args: argparse.Namespace, model: str, served: str, **workload: object
) -> dict:
    """The report's opening keys: what ran on which machine, and the workload (`workload`:
    the benchmark's own workload options)."""
    return {
        "benchmark": benchmark,
        "machine": sb.machine(),
        "profile": args.profile,
        "model": {"tokenizer": sb._display_path(model), "served_name": served},
        "workload": {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "requests_per_user": args.requests_per_user,
            "max_num_seqs": args.max_num_seqs,
            **workload,
            "sampling": "greedy, ignore_eos",
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.concurrency, args.output_len, args.input_len = "1,8", 16, 16
    args.quick_model = args.quick
    model, vocab, reserved = sb.resolve_model(argparse.Namespace(model=args.model, quick=False))
    served = Path(model).name
    points = []
    engine_cache: dict[int, dict] = {}
    chat_tok = load_tokenizer(model) if args.endpoint == "chat" else None
    for workers in (int(x) for x in args.workers.split(",")):
        for apis in (int(x) for x in args.apis.split(",")):
            stack = Stack(
                model, served, args.profile, workers, apis, args.max_num_seqs,
                (*args.worker_flags.split(), "--async-scheduling", args.async_scheduling),
            )  # fmt: skip
            try:
                stack.start()
                for per_worker in (int(x) for x in args.concurrency.split(",")):
                    c = per_worker * workers
                    n = max(c * args.requests_per_user, 8)
                    wl = sb.make_workload(
                        n, args.input_len, args.output_len, 0.0, vocab, reserved, per_worker
                    )
                    if per_worker not in engine_cache:
                        ewl = sb.make_workload(
                            max(per_worker * args.requests_per_user, 8), args.input_len,
                            args.output_len, 0.0, vocab, reserved, per_worker,
                        )  # fmt: skip
                        if chat_tok is not None:
                            ewl = chat_ids(chat_tok, chat_texts(chat_tok, ewl))
                        engine_cache[per_worker] = engine_point(
                            model,
                            args.profile,
                            args.max_num_seqs,
                            ewl,
                            per_worker,
                            args.async_scheduling,
                        )
                    if chat_tok is not None:
                        wl = chat_texts(chat_tok, wl)
                    engine = engine_cache[per_worker]
                    load_before = round(os.getloadavg()[0], 2)
                    st = stack_point(stack, wl, c, args.client, args.endpoint)
                    cmp = compare(engine, st, workers)
                    points.append({"workers": workers, "apis": apis, "concurrency": c,
                                   "load_avg_1m": round(os.getloadavg()[0], 2),
                                   "load_avg_1m_before": load_before,
                                   "engine": engine, "stack": st, "compare": cmp})  # fmt: skip
                    print(
                        f"w={workers} a={apis} c={c:<4} engine {engine['output_tok_s'] * workers:>9.0f}"
                        f" stack {st['output_tok_s']:>9.0f} tok/s ratio {cmp['throughput_ratio']:.3f}"
                        f"  +TTFT p50 {cmp['added_ttft_ms_p50']:+.1f} ms  +ITL p50 "
                        f"{cmp['added_itl_ms_p50']:+.1f} ms  inflation {st['step_inflation']}"
                        f" (alone {engine['step_inflation']})  CPU us/tok "
                        f"{st['cpu_us_per_token_by_role']}"
                        f"{'  FAILED ' + str(st['failed']) if st['failed'] else ''}",
                        flush=True,
                    )
            finally:
                stack.stop()
    report = {
        **report_head(
            "token_plane",
            args,
            model,
            served,
            client=args.client,
            endpoint=args.endpoint,
            worker_flags=args.worker_flags,
            async_scheduling=args.async_scheduling,
        ),
        "points": points,
        "targets": {
            "worker_token_plane_cpu_us_per_delta": "<= 3",
            "api_cpu_us_per_token": "<= 30",
            "step_inflation": "<= 0.05",
            "throughput_ratio_at_256": ">= 0.95",
            "added_ttft_ms_p50_at_1": "<= 3",
        },
        "note": "all processes (nats-server, workers, APIs, client) share this machine; "
        "cpu_us_per_token: CPU seconds of each process per output token during the point; "
        "worker_token_plane = worker CPU minus the simulated engine's own host CPU per token",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    before = json.loads(Path(args.compare_with).read_text()) if args.compare_with else None
    plot(report, out.with_suffix(".png"), before)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
