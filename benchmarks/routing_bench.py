"""Prefix routing benchmark: multi-turn chat on 2 and 4 workers (simulated GPUs or CPU
workers), routing on vs off in one run, against one worker that has all the memory.

Workload: `--users` users, each a conversation of `--turns` turns on one of
`--system-prompts` shared system prompts. Turn k's prompt is the system prompt, the
conversation so far (each earlier user message and a fixed stand-in for the assistant's
reply) and a new user message, so a turn's prompt extends the previous turn's: a worker
that ran turn k-1 holds all of turn k's prefix but the last messages. (The reply in the
history is fixed tokens, not the generated ones, so a turn reuses the previous prompt,
never the previous reply: a lower bound on the hit rate real chats get.) Users start a
few ms apart. By default each runs its turns back to back (closed loop: a faster arm
also sends more turns per second, so part of what it saves shows as throughput, not as
TTFT); with `--think-s` each turn is sent at a fixed instant (the previous turn's instant
+ think-s, later only if the previous turn is still running), the same in every arm, and
`--think-jitter` draws each think time around think-s (seeded), as people's differ.

Workers run the simulated device (`--load-format simulated`: Llama-3.1-8B on an L4 by
default, the real scheduler and block manager with a roofline clock); with `--engine cpu`
they run the real engine on CPU (`--engine-threads` torch threads each), by default on a
random ~52M Llama with the demo tokenizer, built once. `--cells` lists
the cluster shapes, `WxB` (W workers of B KV blocks) or `W` (the KV cache cut so that all
workers together hold the workload's distinct blocks once): a prefix cached on two
workers then pushes another out, so where a prefix is cached matters. Arms, each on a
fresh stack (nats-server, workers, one API), same workload, each warmed up first with
2 x W short unrelated requests (first-request costs of every process stay out of the
figures):
- `queue`  (`--routing queue`): the shared queue, the first free worker takes each job;
- `prefix` (`--routing prefix`): the API routes to the worker holding the prefix, and
  cold prompts (no worker holds any block) go to the shared queue;
- `place` (`--routing prefix --routing-cold place`): cold prompts go to the least loaded
  worker, and the router counts what it sent as cached there until the job ends;
- `single`: one worker with the memory of all of them (`W x --blocks-per-worker`), the
  hit rate to reach (its TTFT is not comparable: it has 1/W of the compute).

Reported per arm: prefix-cache hit rate (cached prompt tokens / prompt tokens, from the
usage the engine returns), TTFT p50/p99 (from the request's send to its first token),
output tok/s, the router's decisions, the workers' fallbacks and the step inflation (wall
time between engine steps over the simulated device time of those steps, minus one: how
much the host added); and the ratios the issue sets goals for, for each routing arm. The
machine's load average goes into the JSON: this is meant for a shared CPU box, where the
arms of one run see the same load (rounds alternate their order).

    python benchmarks/routing_bench.py                 # the four cells of docs/routing.md
    python benchmarks/routing_bench.py --quick         # a smoke run, seconds
    python benchmarks/routing_bench.py --engine cpu --cells 2,4 --users 16 --system-len 256 \
        --user-len 128 --reply-len 128 --think-s 10 --think-jitter 0.5 \
        --out benchmarks/results/routing_cpu.json       # CPU workers, as docs/routing.md
Writes benchmarks/results/routing.json (`--out`) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench as sb  # noqa: E402  (sibling scripts, not a package)
import stack_processes as sp  # noqa: E402
from box_load import LOAD_NOTE  # noqa: E402

BLOCK_SIZE = 16


# ---- workload ------------------------------------------------------------------------------


@dataclass
class Chat:
    """The token ids of one user's conversation: system prompt, then per turn a user
    message and the stand-in reply that the next turn's history carries."""

    system: list[int]
    messages: list[list[int]]
    replies: list[list[int]]

    def prompt(self, turn: int) -> list[int]:
        out = list(self.system)
        for k in range(turn):
            out += self.messages[k] + self.replies[k]
        return out + self.messages[turn]


def make_chats(args: argparse.Namespace, vocab: int, reserved: int) -> list[Chat]:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(reserved, vocab) for _ in range(n)]

    systems = [tokens(args.system_len) for _ in range(args.system_prompts)]
    return [
        Chat(
            systems[u % len(systems)],
            [tokens(args.user_len) for _ in range(args.turns)],
            [tokens(args.reply_len) for _ in range(args.turns)],
        )
        for u in range(args.users)
    ]


def send_offsets(args: argparse.Namespace) -> list[list[float]]:
    """Per user, the seconds after the start at which each turn is due: user u starts at
    u x stagger, and each think time is think-s, or with --think-jitter j a seeded draw
    from think-s x [1 - j, 1 + j]. Closed loop (think-s 0): only the first turns' starts
    count. Without jitter every burst arrives in user order, so on a shared queue the
    workers' alternating pulls give a user the same worker turn after turn: a stickiness
    that arrivals of people, whose think times differ, do not give it."""
    rng = random.Random(args.seed + 1)
    out = []
    for u in range(args.users):
        due, row = u * args.stagger_ms / 1000, []
        for _ in range(args.turns):
            row.append(due)
            due += args.think_s * (1 + args.think_jitter * (2 * rng.random() - 1))
        out.append(row)
    return out


# ---- one request ---------------------------------------------------------------------------


async def stream_turn(
    client: httpx.AsyncClient, model: str, prompt: list[int], n: int
) -> sb.RequestResult:
    """One streamed completion; ok only with the usage chunk, which carries the cached
    prompt tokens the hit rate is counted from."""
    res = await sb.stream_completion(client, model, prompt, n)
    res.ok = res.ok and res.prompt_tokens > 0
    return res


async def warm_up(url: str, model: str, requests: int, vocab: int) -> float:
    """Short prompts that share nothing with the workload, all at once: every process's
    first-request costs (connections, imports, caches) are paid before the clock runs.
    Then one alone on the idle stack: its TTFT (ms) is the path's floor (HTTP, NATS, a
    pull, one device step of ~90 ms on an L4, the token back), which routing cannot cut."""
    rng = random.Random(-1)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0)) as client:
        await asyncio.gather(
            *(
                stream_turn(client, model, [rng.randrange(8, vocab) for _ in range(40)], 2)
                for _ in range(requests)
            )
        )
        await asyncio.sleep(0.5)
        alone = [
            await stream_turn(client, model, [rng.randrange(8, vocab) for _ in range(40)], 2)
            for _ in range(3)
        ]
    return round(sorted(t.ttft for t in alone)[1] * 1000, 2)


async def run_chats(url: str, model: str, chats: list[Chat], args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=len(chats) + 8, max_keepalive_connections=len(chats) + 8)
    timeout = httpx.Timeout(600.0, connect=10.0)
    turns: list[sb.RequestResult] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        late = 0

        async def user(u: int, chat: Chat) -> None:
            nonlocal late
            for t in range(args.turns):
                # Closed loop (think 0): each turn after the last one ends. Scheduled: at
                # its instant of `send_offsets`, the same in every arm.
                wait = t0 + offsets[u][t] - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif t > 0 and args.think_s > 0 and wait < -0.005:
                    late += 1  # the previous turn outlasted the think time
                turns.append(await stream_turn(client, model, chat.prompt(t), args.max_tokens))

        offsets = send_offsets(args)
        t0 = time.perf_counter()
        await asyncio.gather(*(user(u, c) for u, c in enumerate(chats)))
        wall = time.perf_counter() - t0
    ok = [t for t in turns if t.ok]
    prompt, cached = sum(t.prompt_tokens for t in ok), sum(t.cached_tokens for t in ok)
    return {
        **sb.summarize(turns, wall),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "late_turns": late,
    }


def engine_args(args: argparse.Namespace) -> list[str]:
    """The worker flags of `--engine`."""
    if args.engine == "cpu":  # the real engine on the model's weights, fp32
        return ["--engine-threads", str(args.engine_threads)]
    return ["--load-format", "simulated", "--simulate-profile", args.profile]


# ---- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    """nats-server, workers (simulated or CPU) and one API replica, as subprocesses."""

    model: str
    args: argparse.Namespace
    workers: int
    blocks: int
    routing: str
    cold: str = "queue"
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="jetserve-route-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    url: str = ""

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.procs[name] = sp.spawn(self.tmp / f"{name}.log", argv, env)

    def start(self) -> None:
        self.procs["nats"], nats_url = sp.start_nats(self.tmp)
        env = sp.service_env()
        cli = [sys.executable, "-m", "services.cli"]
        worker_env = {**env, "JETSERVE_LOG_LEVEL": "info"}  # the device's stats lines
        for i in range(self.workers):
            port = sb.free_port()
            self.metrics_ports[f"worker{i}"] = port
            self._spawn(
                f"worker{i}",
                [*cli, "worker", "--model", self.model, "--model-name", "chat",
                 "--nats-url", nats_url, "--metrics-host", "127.0.0.1",
                 "--metrics-port", str(port), "--worker-id", f"w{i}",
                 *engine_args(self.args), "--max-num-seqs", str(self.args.max_num_seqs),
                 "--block-size", str(BLOCK_SIZE), "--num-kv-blocks", str(self.blocks),
                 "--route-fallback", str(self.args.route_fallback)],
                worker_env,
            )  # fmt: skip
        port = sb.free_port()
        self._spawn(
            "api",
            [*cli, "api", "--nats-url", nats_url, "--host", "127.0.0.1", "--port", str(port),
             "--routing", self.routing, "--routing-load-tokens", str(self.args.load_tokens),
             "--routing-cold", self.cold],
            env,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        sb.wait_ready(f"{self.url}/ready", timeout=180)
        deadline = time.monotonic() + 120
        while len(self._live_workers()) < self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not all register")
            time.sleep(0.3)
        time.sleep(1.5)  # one more heartbeat: the API sees every worker's block size

    def _live_workers(self) -> list:
        resp = httpx.get(f"{self.url}/metrics", timeout=10)
        for name, labels, value in sb_parse(resp.text):
            if name == "jetserve:workers" and labels.get("model_name") == "chat":
                return [None] * int(value)
        return []

    def api_metrics(self) -> list[tuple[str, dict, float]]:
        return sb_parse(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def worker_metrics(self) -> list[tuple[str, dict, float]]:
        return [s for port in self.metrics_ports.values() for s in self.worker_metrics_of(port)]

    def worker_metrics_of(self, port: int) -> list[tuple[str, dict, float]]:
        return sb_parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)

    def device_stats(self) -> dict[str, dict]:
        """The latest `simulated_device` line of each worker's log (one every 2 s of steps)."""
        return {
            name: sp.last_device_stats(self.tmp / f"{name}.log")
            for name in self.procs
            if name.startswith("worker")
        }

    def stop(self) -> None:
        sp.stop_processes(self.procs)
        shutil.rmtree(self.tmp, ignore_errors=True)


def step_inflation(before: dict[str, dict], after: dict[str, dict]) -> float | None:
    """Wall time between busy steps over their simulated device time, minus one, summed
    over workers for the measured run: 0 means the host added nothing to the device."""
    period = sum(
        a.get("busy_period_s", 0) - before[n].get("busy_period_s", 0) for n, a in after.items()
    )
    device = sum(
        a.get("busy_device_s", 0) - before[n].get("busy_device_s", 0) for n, a in after.items()
    )
    return round(period / device - 1, 4) if device > 0 else None


def sb_parse(text: str) -> list[tuple[str, dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def metric_sum(samples, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


ARMS = {"queue": ("queue", "queue"), "prefix": ("prefix", "queue"), "place": ("prefix", "place")}


def run_arm(model: str, chats: list[Chat], args, workers: int, blocks: int, arm: str) -> dict:
    routing, cold = ARMS[arm]
    print(f"  {workers} worker(s) x {blocks} blocks, {arm} ...", flush=True)
    stack = Stack(model, args, workers, blocks, routing, cold)
    try:
        stack.start()
        idle_ttft = asyncio.run(warm_up(stack.url, "chat", 2 * workers, args.vocab))
        time.sleep(1.5)  # a heartbeat: the router sees idle workers again
        api0 = stack.api_metrics()
        wk0 = {port: stack.worker_metrics_of(port) for port in stack.metrics_ports.values()}
        dev0 = stack.device_stats()
        load_before = os.getloadavg()
        result = asyncio.run(run_chats(stack.url, "chat", chats, args))
        load_after = os.getloadavg()
        time.sleep(2.5)  # the workers' next device-stats line covers the run's last steps
        dev1 = stack.device_stats()
        api = delta(stack.api_metrics(), api0)
        wk_each = [delta(stack.worker_metrics_of(p), before) for p, before in wk0.items()]
        wk = [sample for samples in wk_each for sample in samples]
        per_worker = [metric_sum(samples, "jetserve:jobs_pulled_total") for samples in wk_each]
    finally:
        stack.stop()
    result.update(
        workers=workers,
        blocks_per_worker=blocks,
        routing=routing,
        routing_cold=cold,
        arm=arm,
        idle_ttft_ms=idle_ttft,
        step_inflation=step_inflation(dev0, dev1),
        decisions={
            d: metric_sum(api, "jetserve:routing_decisions_total", decision=d)
            for d in ("routed", "placed", "cold", "no_worker")
        },
        predicted_hit_rate=round(
            metric_sum(api, "jetserve:routing_cached_tokens_total")
            / max(metric_sum(api, "jetserve:routing_prompt_tokens_total"), 1),
            4,
        ),
        fallbacks=metric_sum(wk, "jetserve:routed_fallbacks_total"),
        pulled={
            q: metric_sum(wk, "jetserve:jobs_pulled_total", queue=q) for q in ("routed", "shared")
        },
        # Jobs each worker ran (routed + shared pulls): how even the placement was.
        per_worker=per_worker,
        load_avg_before=[round(x, 2) for x in load_before],
        load_avg_after=[round(x, 2) for x in load_after],
    )
    print(
        f"    hit rate {result['hit_rate']:.3f}, TTFT p50 {result['ttft_ms_p50']} ms p99 "
        f"{result['ttft_ms_p99']} ms, {result['output_tok_s']} tok/s, failed {result['failed']}, "
        f"step inflation {result['step_inflation']}, load {load_after[0]:.1f}",
        flush=True,
    )
    return result


def delta(after: list, before: list) -> list[tuple[str, dict, float]]:
    """Counters over the measured run only (the warm-up's requests taken out)."""
    base: dict = {}
    for name, labels, value in before:
        key = (name, tuple(sorted(labels.items())))
        base[key] = base.get(key, 0.0) + value
    return [
        (n, lab, v - base.get((n, tuple(sorted(lab.items()))), 0.0))
        if n.endswith("_total")
        else (n, lab, v)
        for n, lab, v in after
    ]


def mean_of(results: list[dict]) -> dict:
    """The numeric fields averaged over rounds (the rest from the first)."""
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in results if isinstance(r.get(key), int | float)]
            out[key] = round(sum(values) / len(values), 4)
    out["rounds"] = len(results)
    return out


def goals(by: dict, arm: str) -> dict:
    queue, routed, single = by["queue"], by[arm], by["single"]
    uncached = 1 - queue["hit_rate"]
    return {
        # Prefill tokens saved against the shared queue, and the most any placement could
        # save: what one worker with all the memory leaves uncached.
        "prefill_cut": round(1 - (1 - routed["hit_rate"]) / uncached, 4) if uncached else None,
        "prefill_cut_bound": round(1 - (1 - single["hit_rate"]) / uncached, 4)
        if uncached
        else None,
        "hit_rate_vs_single": round(routed["hit_rate"] / single["hit_rate"], 4)
        if single["hit_rate"]
        else None,
        "ttft_p50_cut": round(1 - routed["ttft_ms_p50"] / queue["ttft_ms_p50"], 4),
        "ttft_p99_cut": round(1 - routed["ttft_ms_p99"] / queue["ttft_ms_p99"], 4),
        "throughput_ratio": round(routed["output_tok_s"] / queue["output_tok_s"], 4),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    arms = [a for a in report["arms"] if a != "single"]
    colors = {"queue": "#999", "prefix": "#7b5", "place": "#2a7", "single": "#37c"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    labels = [f"{p['workers']} x {p['blocks_per_worker']}" for p in points]
    x = range(len(points))
    width = 0.8 / (len(arms) + 1)
    for k, arm in enumerate([*arms, "single"]):
        xs = [i + (k - len(arms) / 2) * width for i in x]
        axes[0].bar(xs, [p["arms"][arm]["hit_rate"] for p in points], width, label=arm,
                    color=colors.get(arm))  # fmt: skip
    axes[0].set_title("prefix-cache hit rate")
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        xs = [i + (k - (len(arms) - 1) / 2) * width for i in x]
        p50 = [p["arms"][arm]["ttft_ms_p50"] for p in points]
        p99 = [p["arms"][arm]["ttft_ms_p99"] for p in points]
        axes[1].bar(xs, p50, width, label=f"{arm} p50", color=colors.get(arm))
        axes[1].scatter(xs, p99, marker="_", s=300, color="k", label="p99" if k == 0 else None)
        axes[2].bar(
            xs, [p["arms"][arm]["output_tok_s"] for p in points], width, label=arm,
            color=colors.get(arm),
        )  # fmt: skip
    axes[1].set_title("TTFT (ms): bars p50, dashes p99")
    axes[2].set_title("output tokens/s")
    for ax in axes:
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("workers x KV blocks each")
        ax.legend(fontsize=8)
    wl = report["workload"]
    load = report["load_avg_start"][0], report.get("load_avg_end", [0.0])[0]
    engine = (
        f"CPU workers ({report['model']['name']}, {report['model']['params_millions']}M, "
        f"{wl['engine_threads']} thread each)"
        if report.get("engine") == "cpu"
        else f"simulated {report['profile']}"
    )
    fig.suptitle(
        f"prefix routing, {engine}: {wl['users']} users x {wl['turns']} turns,"
        f" {wl['system_prompts']} system prompts of {wl['system_len']} tokens, "
        + (f"a turn every {wl['think_s']} s " if wl.get("think_s") else "closed loop ")
        + (f"+-{wl['think_jitter']:.0%} " if wl.get("think_jitter") else "")
        + f"(shared 2-core CPU, load avg {load[0]:.1f} at start, {load[1]:.1f} at end)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", default="4x714,2x714,2x1072,4x536",
                   help="cluster shapes, comma-separated: WxB (W workers of B KV blocks of 16 "
                   "tokens) or W (the workload's distinct blocks / W each)")  # fmt: skip
    p.add_argument("--arms", default="queue,prefix,place",
                   help=f"routing arms, comma-separated, of {', '.join(ARMS)}")  # fmt: skip
    # An L4: prefill (what a cached prefix saves) dominates time to first token there, as
    # it does on any GPU under load; on an H100 the 8B model's prefill (~40 ms per 1k
    # tokens) is below what a shared 2-core host adds to every request.
    p.add_argument("--engine", choices=("simulated", "cpu"), default="simulated",
                   help="simulated: the simulated GPU (--profile); cpu: the real engine on "
                   "CPU, on --model or a random Llama of --model-preset with the demo "
                   "tokenizer")  # fmt: skip
    p.add_argument("--profile", default="l4-llama3-8b", help="the simulated device")
    p.add_argument("--model-preset", default="llama50m",
                   help="--engine cpu without --model: this preset of "
                   "benchmarks/serving_checkpoints.py")  # fmt: skip
    p.add_argument("--engine-threads", type=int, default=1,
                   help="--engine cpu: torch threads of each worker")  # fmt: skip
    p.add_argument("--users", type=int, default=24)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-prompts", type=int, default=4)
    p.add_argument("--system-len", type=int, default=512)
    p.add_argument("--user-len", type=int, default=192)
    p.add_argument("--reply-len", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="runs of each routing arm, alternated")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--load-tokens", type=float, default=64.0)
    p.add_argument("--route-fallback", type=float, default=1.0)
    p.add_argument("--stagger-ms", type=float, default=20.0)
    p.add_argument("--think-s", type=float, default=0.0,
                   help="0: closed loop, each user's next turn as soon as the last one ends; "
                   ">0: turn k of user u is sent at u x stagger + k x think-s (or when turn "
                   "k-1 ends, if later: counted in late_turns), so every arm gets the same "
                   "arrivals")  # fmt: skip
    p.add_argument("--think-jitter", type=float, default=0.0,
                   help="scheduled arrivals: each think time drawn from think-s x [1 - j, "
                   "1 + j] (seeded, the same in every arm); 0 keeps every burst in user "
                   "order")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small workload on 2 workers")
    p.add_argument("--model", help="model folder: the tokenizer, and with --engine cpu the "
                   "weights (default: a tiny checkpoint; --engine cpu: --model-preset)")  # fmt: skip
    p.add_argument("--out", default=str(RESULTS / "routing.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.cells, args.users, args.turns, args.system_len, args.rounds = "2", 8, 3, 256, 1
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown or "queue" not in args.arms.split(","):
        p.error(f"--arms: need queue and known arms, got {args.arms}")
    return args


def resolve_model(args: argparse.Namespace) -> tuple[str, int, int]:
    """(folder, vocab size, first non-special id): --model; else for CPU workers the
    preset, built once; else a tiny checkpoint, only its tokenizer used."""
    return sb.resolve_model(
        argparse.Namespace(
            quick=args.engine == "simulated" and not args.model,
            model=args.model,
            model_preset=args.model_preset if args.engine == "cpu" else None,
        )
    )


def model_info(path: str) -> dict:
    """Name and size of the served model, for the report (the CPU arms' cost model)."""
    from safetensors import safe_open

    params = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return {"name": Path(path).name, "params": params, "params_millions": round(params / 1e6, 1)}


def parse_cells(spec: str, working_set: int) -> list[tuple[int, int]]:
    cells = []
    for cell in spec.split(","):
        workers, _, blocks = cell.strip().partition("x")
        w = int(workers)
        cells.append((w, int(blocks) if blocks else max(working_set // w, 64)))
    return cells


def distinct_blocks(chats: list[Chat], args) -> int:
    seen: set[tuple[int, ...]] = set()
    for chat in chats:
        for t in range(args.turns):
            prompt = chat.prompt(t)
            for i in range(len(prompt) // BLOCK_SIZE):
                seen.add(tuple(prompt[: (i + 1) * BLOCK_SIZE]))
    return len(seen)


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, args.vocab, reserved = resolve_model(args)
    chats = make_chats(args, args.vocab, reserved=max(reserved, 8))
    working_set = distinct_blocks(chats, args)
    arms = args.arms.split(",")
    print(f"workload: {len(chats)} users x {args.turns} turns, {working_set} distinct blocks",
          flush=True)  # fmt: skip
    report = {
        "benchmark": "routing",
        "engine": args.engine,
        "profile": args.profile if args.engine == "simulated" else None,
        "model": model_info(model) if args.engine == "cpu" else None,
        "machine": {**sb.machine(), "load_note": LOAD_NOTE},
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "arms": {**{a: ARMS[a] for a in arms}, "single": ("queue", "queue")},
        "workload": {
            k: getattr(args, k)
            for k in (
                "users",
                "turns",
                "system_prompts",
                "system_len",
                "user_len",
                "reply_len",
                "max_tokens",
                "max_num_seqs",
                "load_tokens",
                "route_fallback",
                "stagger_ms",
                "think_s",
                "think_jitter",
                "seed",
                "rounds",
                "engine_threads",
            )
        },
        "distinct_blocks": working_set,
        "points": [],
    }
    for workers, blocks in parse_cells(args.cells, working_set):
        runs: dict[str, list[dict]] = {arm: [] for arm in [*arms, "single"]}
        for r in range(args.rounds):
            # Rotate the order, so no arm always runs while the machine is busier.
            for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
                runs[arm].append(run_arm(model, chats, args, workers, blocks, arm))
        runs["single"].append(run_arm(model, chats, args, 1, workers * blocks, "queue"))
        means = {arm: mean_of(results) for arm, results in runs.items()}
        point = {
            "workers": workers,
            "blocks_per_worker": blocks,
            "arms": means,
            "goals": {arm: goals(means, arm) for arm in arms if arm != "queue"},
            "runs": runs,
        }
        print(f"  goals: {point['goals']}", flush=True)
        report["points"].append(point)
        report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        write(report, Path(args.out))  # after every point: a long run keeps what it measured
    out = Path(args.out)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
