"""Engine in a thread vs in its own process: the exchange's cost, and what it buys.

Three measurements, all in one run so every arm sees the same machine load:

1. codec: a decode-like StepResult of N one-token outputs encoded (the engine
   process's side) and framed + decoded (the worker's side), microseconds per step and
   per token, best of several repeats;
2. link: the simulated engine in a real child process (`EngineProcess`) driven from an
   event loop with a closed loop of requests: the CPU the driving process spends per
   step and per token (reading the socket, decoding, dispatching: what the worker pays
   for the link) vs the same loop over `EngineThread`, where the engine's own Python
   work is in the driving process;
3. stack: `token_plane_bench`'s full stack (nats-server, one simulated worker, one API,
   the streaming client) with `--no-engine-process` and `--engine-process`,
   alternated over rounds: step-period inflation, worker CPU per token (worker process,
   its engine process), throughput and added latency.

    python benchmarks/engine_process_bench.py               # c=1 and c=256, 2 rounds
    python benchmarks/engine_process_bench.py --quick       # smoke test

Writes benchmarks/results/engine_process.json (`--out`) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench as sb  # sibling scripts, not a package
import token_plane_bench as tp

RESULTS = sb.RESULTS
MODES = {"thread": ("--no-engine-process",), "process": ("--engine-process",)}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- 1. codec ------------------------------------------------------------------------------


def decode_step(num_outputs: int):
    """A decode step's result: one token for each of `num_outputs` running jobs."""
    from engine_worker.engine.outputs import CompletionDelta, EngineStats, RequestOutput
    from engine_worker.engine_core.messages import StepResult

    outputs = [
        RequestOutput(f"{os.urandom(16).hex()}@1", [CompletionDelta(0, [1000 + i])], False, 128, 0)
        for i in range(num_outputs)
    ]
    stats = EngineStats(num_outputs, 0, 20000, 26162, 0.2, 0.0, 0)
    return StepResult(outputs, stats, 0, num_outputs, step_time_s=0.0159)


def codec_point(num_outputs: int, repeats: int = 7) -> dict:
    from engine_worker.engine_core import codec
    from engine_worker.engine_core.frames import FrameDecoder, frame

    result = decode_step(num_outputs)
    payload = codec.encode_step(result)
    framed = frame(payload)
    loops = max(20_000 // max(num_outputs, 1), 20)

    def best(fn) -> float:
        """CPU seconds per call (the thread's own CPU: other jobs on the box do not count)."""
        times = []
        for _ in range(repeats):
            t0 = time.thread_time()
            for _ in range(loops):
                fn()
            times.append((time.thread_time() - t0) / loops)
        return min(times)

    decoder = FrameDecoder()
    encode_s = best(lambda: frame(codec.encode_step(result)))
    decode_s = best(lambda: [codec.decode(f) for f in decoder.feed(framed)])
    assert codec.decode(payload) == result
    n = max(num_outputs, 1)
    return {
        "outputs_per_step": num_outputs,
        "frame_bytes": len(framed),
        "encode_us_per_step": round(1e6 * encode_s, 2),
        "decode_us_per_step": round(1e6 * decode_s, 2),
        "encode_us_per_token": round(1e6 * encode_s / n, 3),
        "decode_us_per_token": round(1e6 * decode_s / n, 3),
    }


# ---- 2. the link, without NATS -------------------------------------------------------------


async def _drive(handle_factory, wl: sb.Workload, c: int) -> dict:
    """A closed loop of `c` requests through an engine handle on this event loop."""
    from engine_worker.engine_core.messages import AddRequest, StepResult
    from shared.sampling_params import SamplingParams

    done = asyncio.Event()
    pending = list(zip(wl.prompts, wl.output_lens, strict=True))[::-1]
    active: set[str] = set()
    counts = {"steps": 0, "tokens": 0}
    handle = None
    next_id = [0]

    def submit() -> None:
        while pending and len(active) < c:
            prompt, n = pending.pop()
            rid = f"r{next_id[0]}"
            next_id[0] += 1
            active.add(rid)
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            handle.add(AddRequest(rid, prompt, params))

    def on_result(r: StepResult) -> None:
        assert r.fatal is None, r.fatal
        if r.outputs:
            counts["steps"] += 1
        for out in r.outputs:
            counts["tokens"] += sum(len(d.token_ids) for d in out.deltas)
            if out.finished:
                active.discard(out.request_id)
        submit()
        if not pending and not active:
            done.set()

    handle = await handle_factory(on_result)
    cpu0, t0 = self_cpu_s(), time.perf_counter()
    submit()
    await done.wait()
    cpu, wall = self_cpu_s() - cpu0, time.perf_counter() - t0
    handle.stop()
    await asyncio.to_thread(handle.join, 30)
    return {
        "steps": counts["steps"],
        "tokens": counts["tokens"],
        "tok_s": round(counts["tokens"] / wall, 1),
        "driver_cpu_us_per_step": round(1e6 * cpu / max(counts["steps"], 1), 1),
        "driver_cpu_us_per_token": round(1e6 * cpu / max(counts["tokens"], 1), 2),
    }


def link_point(model: str, profile: str, seqs: int, wl: sb.Workload, c: int, mode: str) -> dict:
    settings = {
        "model": model,
        "load_format": "simulated",
        "simulate_profile": profile,
        "max_num_seqs": seqs,
    }

    async def thread_handle(on_result):
        from engine_worker.engine.config import EngineConfig
        from engine_worker.engine.factory import build_engine
        from engine_worker.worker.engine_thread import EngineThread

        engine = build_engine(EngineConfig(**settings))
        thread = EngineThread(engine, asyncio.get_running_loop(), on_result)
        thread.start()
        return thread

    async def process_handle(on_result):
        from engine_worker.engine_core.client import EngineProcess

        proc = EngineProcess(
            {"engine": settings, "log_level": "warning"}, asyncio.get_running_loop(), on_result
        )
        await proc.launch(timeout_s=120)
        return proc

    factory = thread_handle if mode == "thread" else process_handle
    point = asyncio.run(_drive(factory, wl, c))
    point.update(mode=mode, concurrency=c, load_avg=load_avg())
    return point


# ---- 3. the stack --------------------------------------------------------------------------


def stack_run(args, model, served, vocab, reserved, mode: str, engines: dict) -> list[dict]:
    stack = tp.Stack(model, served, args.profile, 1, 1, args.max_num_seqs, MODES[mode])
    points = []
    try:
        stack.start()
        for c in args.concurrency:
            n = max(c * args.requests_per_user, 8)
            wl = sb.make_workload(n, args.input_len, args.output_len, 0.0, vocab, reserved, c)
            load0 = load_avg()
            st = tp.stack_point(stack, wl, c, "httpx")
            roles = st["cpu_us_per_token_by_role"]
            worker_cpu, engine_cpu = roles["worker"], roles.get("engine", 0.0)
            cmp = tp.compare(engines[c], st, 1)
            points.append(
                {
                    "mode": mode,
                    "concurrency": c,
                    "load_avg_before": load0,
                    "load_avg_after": load_avg(),
                    "stack_tok_s": st["output_tok_s"],
                    "throughput_ratio": cmp["throughput_ratio"],
                    "step_inflation": st["step_inflation"],
                    "worker_cpu_us_per_token": round(worker_cpu + engine_cpu, 1),
                    "worker_process_cpu_us_per_token": worker_cpu,
                    "engine_process_cpu_us_per_token": round(engine_cpu, 1),
                    "api_cpu_us_per_token": st["cpu_us_per_token_by_role"]["api"],
                    "nats_cpu_us_per_token": st["cpu_us_per_token_by_role"]["nats"],
                    "added_ttft_ms_p50": cmp["added_ttft_ms_p50"],
                    "added_itl_ms_p50": cmp["added_itl_ms_p50"],
                    "added_itl_ms_p99": cmp["added_itl_ms_p99"],
                    "failed": st["failed"],
                    "stack": st,
                }
            )
            p = points[-1]
            print(
                f"stack {mode:<7} c={c:<4} {p['stack_tok_s']:>8.0f} tok/s (ratio "
                f"{p['throughput_ratio']:.3f})  inflation {p['step_inflation']}  worker "
                f"{p['worker_process_cpu_us_per_token']} + engine "
                f"{p['engine_process_cpu_us_per_token']} us/tok  load {load0[0]}",
                flush=True,
            )
    finally:
        stack.stop()
    return points


def summarize_stack(points: list[dict]) -> list[dict]:
    """Per concurrency: the median of each mode's rounds, and process/thread ratios."""
    out = []
    for c in sorted({p["concurrency"] for p in points}):
        row: dict = {"concurrency": c}
        for mode in MODES:
            mine = [p for p in points if p["concurrency"] == c and p["mode"] == mode]
            if not mine:
                continue
            row[mode] = {
                key: round(statistics.median(p[key] for p in mine if p[key] is not None), 4)
                for key in (
                    "stack_tok_s",
                    "throughput_ratio",
                    "step_inflation",
                    "worker_cpu_us_per_token",
                    "worker_process_cpu_us_per_token",
                    "engine_process_cpu_us_per_token",
                    "added_itl_ms_p50",
                    "added_ttft_ms_p50",
                )
                if any(p[key] is not None for p in mine)
            }
        out.append(row)
    return out


# ---- report --------------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["stack_summary"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    labels = [f"c={r['concurrency']}" for r in rows]
    xs = range(len(rows))
    w = 0.38
    for k, (mode, color) in enumerate((("thread", "tab:orange"), ("process", "tab:blue"))):
        pos = [x + (k - 0.5) * w for x in xs]
        infl = [r.get(mode, {}).get("step_inflation", 0) for r in rows]
        axes[0].bar(pos, infl, w, label=f"engine {mode}", color=color)
        worker = [r.get(mode, {}).get("worker_process_cpu_us_per_token", 0) for r in rows]
        engine = [r.get(mode, {}).get("engine_process_cpu_us_per_token", 0) for r in rows]
        axes[1].bar(pos, worker, w, label=f"{mode}: worker process", color=color)
        axes[1].bar(pos, engine, w, bottom=worker, color=color, alpha=0.4,
                    label=f"{mode}: engine process")  # fmt: skip
        tok = [r.get(mode, {}).get("stack_tok_s", 0) for r in rows]
        axes[2].bar(pos, tok, w, label=f"engine {mode}", color=color)
    for ax, title in zip(
        axes,
        ("step-period inflation (goal <= 0.05)", "worker CPU us per token", "stack tok/s"),
        strict=True,
    ):
        ax.set_xticks(list(xs), labels)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_ylim(bottom=5)
    fig.suptitle(
        f"jetserve engine thread vs engine process, simulated {report['profile']}, 1 worker, "
        f"1 API, {report['machine']['cpu_count']}-core CPU (shared, load "
        f"{report['load_avg_start'][0]}-{report['load_avg_end'][0]})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tp.add_workload_args(p)
    p.add_argument("--concurrency", default="1,256")
    p.add_argument("--rounds", type=int, default=2, help="thread/process alternations")
    p.add_argument("--skip-stack", action="store_true", help="codec and link only")
    p.add_argument("--quick", action="store_true", help="tiny workload, smoke test")
    p.add_argument("--out", default=str(RESULTS / "engine_process.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.concurrency, args.output_len, args.input_len, args.rounds = "1,8", 16, 16, 1
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    model, vocab, reserved = sb.resolve_model(argparse.Namespace(model=args.model, quick=False))
    served = Path(model).name
    start = load_avg()

    codec_points = [codec_point(n) for n in (1, 16, 64, 256)]
    for cp in codec_points:
        print(
            f"codec {cp['outputs_per_step']:>3} outputs: encode {cp['encode_us_per_step']} us, "
            f"frame+decode {cp['decode_us_per_step']} us per step "
            f"({cp['decode_us_per_token']} us per token), {cp['frame_bytes']} bytes",
            flush=True,
        )

    link_points = []
    for c in args.concurrency:
        wl = sb.make_workload(
            max(c * args.requests_per_user, 8), args.input_len, args.output_len, 0.0, vocab,
            reserved, c,
        )  # fmt: skip
        for mode in ("thread", "process"):
            lp = link_point(model, args.profile, args.max_num_seqs, wl, c, mode)
            link_points.append(lp)
            print(
                f"link  {mode:<7} c={c:<4} {lp['tok_s']:>8.0f} tok/s  driver CPU "
                f"{lp['driver_cpu_us_per_step']} us/step, {lp['driver_cpu_us_per_token']} us/token",
                flush=True,
            )

    stack_points: list[dict] = []
    engines: dict[int, dict] = {}
    if not args.skip_stack:
        for c in args.concurrency:
            ewl = sb.make_workload(
                max(c * args.requests_per_user, 8), args.input_len, args.output_len, 0.0,
                vocab, reserved, c,
            )  # fmt: skip
            engines[c] = tp.engine_point(model, args.profile, args.max_num_seqs, ewl, c)
            print(
                f"engine alone c={c}: {engines[c]['output_tok_s']:.0f} tok/s, inflation "
                f"{engines[c]['step_inflation']}",
                flush=True,
            )
        for r in range(args.rounds):
            order = ("thread", "process") if r % 2 == 0 else ("process", "thread")
            for mode in order:
                stack_points += stack_run(args, model, served, vocab, reserved, mode, engines)

    report = {
        **tp.report_head("engine_process", args, model, served, rounds=args.rounds),
        "load_avg_start": start,
        "load_avg_end": load_avg(),
        "codec": codec_points,
        "link": link_points,
        "engine_alone": {str(c): e for c, e in engines.items()},
        "stack_points": stack_points,
        "stack_summary": summarize_stack(stack_points) if stack_points else [],
        "note": "one run, all arms alternated on the same machine (shared with other jobs: "
        "see the load averages); codec: CPU time, best of 7 repeats; link: the simulated engine "
        "driven from an event loop without NATS, CPU of the driving process; stack: "
        "medians over rounds; worker_cpu = worker process + its engine process",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if report["stack_summary"]:
        plot(report, out.with_suffix(".png"))
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
