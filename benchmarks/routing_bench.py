"""Prefix routing benchmark: multi-turn chat on 2 and 4 simulated GPU workers, routing on
vs off in one run, against one worker that has all the memory.

Workload: `--users` users, each a conversation of `--turns` turns on one of
`--system-prompts` shared system prompts. Turn k's prompt is the system prompt, the
conversation so far (each earlier user message and a fixed stand-in for the assistant's
reply) and a new user message, so a turn's prompt extends the previous turn's: a worker
that ran turn k-1 holds all of turn k's prefix but the last messages. (The reply in the
history is fixed tokens, not the generated ones, so a turn reuses the previous prompt,
never the previous reply: a lower bound on the hit rate real chats get.) Every user runs
its turns back to back; all users at once (closed loop), started a few ms apart.

Workers run the simulated device (`--load-format simulated`: Llama-3.1-8B on an H100 by
default, the real scheduler and block manager with a roofline clock), with the KV cache
cut so that all workers together hold the workload's distinct blocks once
(`--blocks-per-worker` sets another size): a prefix cached on two workers then pushes
another out, so where a prefix is cached matters. Arms, each on a fresh stack (nats-server, workers, one
API), same workload:
- `queue`  (`--routing queue`): the shared queue, the first free worker takes each job;
- `prefix` (`--routing prefix`): the API routes to the worker holding the prefix;
- `single`: one worker with the memory of all of them (`W x --blocks-per-worker`), the
  hit rate to reach (its TTFT is not comparable: it has 1/W of the compute).

Reported per arm: prefix-cache hit rate (cached prompt tokens / prompt tokens, from the
usage the engine returns), TTFT p50/p99, output tok/s, the router's decisions and the
workers' fallbacks; and the ratios the issue sets goals for. The machine's load average
goes into the JSON: this is meant for a shared CPU box, where both arms see the same load.

    python benchmarks/routing_bench.py                 # 2 and 4 workers
    python benchmarks/routing_bench.py --quick         # a smoke run, seconds
Writes benchmarks/results/routing.json (`--out`) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
import serving_bench as sb  # noqa: E402  (a sibling script, not a package)

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


# ---- one request ---------------------------------------------------------------------------


@dataclass
class Turn:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


async def stream_turn(client: httpx.AsyncClient, model: str, prompt: list[int], n: int) -> Turn:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res, start, chunks = Turn(), time.perf_counter(), 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                res.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return res
            buf = b""
            async for data in resp.aiter_bytes():
                now = time.perf_counter()
                buf += data
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    payload = next(
                        (ln[6:] for ln in event.split(b"\n") if ln.startswith(b"data: ")), None
                    )
                    if payload is None or payload == b"[DONE]":
                        continue
                    if payload.startswith(b'{"error"'):
                        res.error = str(json.loads(payload)["error"].get("message"))
                        return res
                    if b'"choices":[]' in payload or b'"choices": []' in payload:
                        usage = json.loads(payload).get("usage") or {}
                        res.prompt_tokens = int(usage.get("prompt_tokens", 0))
                        details = usage.get("prompt_tokens_details") or {}
                        res.cached_tokens = int(details.get("cached_tokens") or 0)
                        res.output_tokens = int(usage.get("completion_tokens", 0))
                        continue
                    if chunks == 0:
                        res.ttft = now - start
                    chunks += 1
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - start
    res.ok = chunks > 0 and res.prompt_tokens > 0
    return res


async def run_chats(url: str, model: str, chats: list[Chat], args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=len(chats) + 8, max_keepalive_connections=len(chats) + 8)
    timeout = httpx.Timeout(600.0, connect=10.0)
    turns: list[Turn] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def user(u: int, chat: Chat) -> None:
            await asyncio.sleep(u * args.stagger_ms / 1000)
            for t in range(args.turns):
                turns.append(await stream_turn(client, model, chat.prompt(t), args.max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(user(u, c) for u, c in enumerate(chats)))
        wall = time.perf_counter() - t0
    ok = [t for t in turns if t.ok]
    prompt = sum(t.prompt_tokens for t in ok)
    ms = 1000.0
    return {
        "requests": len(turns),
        "failed": len(turns) - len(ok),
        "errors": sorted({t.error for t in turns if not t.ok})[:3],
        "wall_s": round(wall, 3),
        "prompt_tokens": prompt,
        "cached_tokens": sum(t.cached_tokens for t in ok),
        "hit_rate": round(sum(t.cached_tokens for t in ok) / prompt, 4) if prompt else 0.0,
        "output_tokens": sum(t.output_tokens for t in ok),
        "output_tok_s": round(sum(t.output_tokens for t in ok) / wall, 2),
        "ttft_ms_p50": round(sb.percentile([t.ttft for t in ok], 50) * ms, 2),
        "ttft_ms_p99": round(sb.percentile([t.ttft for t in ok], 99) * ms, 2),
        "e2e_ms_p50": round(sb.percentile([t.e2e for t in ok], 50) * ms, 2),
    }


# ---- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    """nats-server, simulated workers and one API replica, as subprocesses."""

    model: str
    args: argparse.Namespace
    workers: int
    blocks: int
    routing: str
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="jetserve-route-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    url: str = ""

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.tmp / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def start(self) -> None:
        nats_port = sb.free_port()
        nats_bin = Path(sys.executable).parent / "nats-server"
        nats = str(nats_bin) if nats_bin.exists() else shutil.which("nats-server")
        if not nats:
            raise SystemExit("nats-server not found")
        nats_url = f"nats://127.0.0.1:{nats_port}"
        argv = [nats, "-js", "-sd", str(self.tmp / "js"), "-a", "127.0.0.1", "-p", str(nats_port)]
        self._spawn("nats", argv, dict(os.environ))
        env = {
            **os.environ,
            "JETSERVE_LOG_LEVEL": "warning",
            "JETSERVE_AUTH": "0",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
        cli = [sys.executable, "-m", "services.cli"]
        for i in range(self.workers):
            port = sb.free_port()
            self.metrics_ports[f"worker{i}"] = port
            self._spawn(
                f"worker{i}",
                [*cli, "worker", "--model", self.model, "--model-name", "chat",
                 "--nats-url", nats_url, "--metrics-host", "127.0.0.1",
                 "--metrics-port", str(port), "--worker-id", f"w{i}",
                 "--load-format", "simulated", "--simulate-profile", self.args.profile,
                 "--max-num-seqs", str(self.args.max_num_seqs),
                 "--block-size", str(BLOCK_SIZE), "--num-kv-blocks", str(self.blocks),
                 "--route-fallback", str(self.args.route_fallback)],
                env,
            )  # fmt: skip
        port = sb.free_port()
        self._spawn(
            "api",
            [*cli, "api", "--nats-url", nats_url, "--host", "127.0.0.1", "--port", str(port),
             "--routing", self.routing, "--routing-load-tokens", str(self.args.load_tokens)],
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

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "nats"] + ["nats"]:
            self.procs[name].terminate()
            try:
                self.procs[name].wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.procs[name].kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


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


def run_arm(model: str, chats: list[Chat], args, workers: int, blocks: int, routing: str) -> dict:
    print(f"  {workers} worker(s) x {blocks} blocks, --routing {routing} ...", flush=True)
    stack = Stack(model, args, workers, blocks, routing)
    load_before = os.getloadavg()
    try:
        stack.start()
        result = asyncio.run(run_chats(stack.url, "chat", chats, args))
        api, wk = stack.api_metrics(), stack.worker_metrics()
        per_worker = [
            metric_sum(stack.worker_metrics_of(port), "jetserve:jobs_pulled_total")
            for port in stack.metrics_ports.values()
        ]
    finally:
        stack.stop()
    result.update(
        workers=workers,
        blocks_per_worker=blocks,
        routing=routing,
        decisions={
            d: metric_sum(api, "jetserve:routing_decisions_total", decision=d)
            for d in ("routed", "cold", "no_worker")
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
        load_avg_after=[round(x, 2) for x in os.getloadavg()],
    )
    print(
        f"    hit rate {result['hit_rate']:.3f}, TTFT p50 {result['ttft_ms_p50']} ms p99 "
        f"{result['ttft_ms_p99']} ms, {result['output_tok_s']} tok/s, failed {result['failed']}",
        flush=True,
    )
    return result


def mean_of(results: list[dict]) -> dict:
    """The numeric fields averaged over rounds (the rest from the first)."""
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = round(sum(r[key] for r in results) / len(results), 4)
    out["rounds"] = len(results)
    return out


def goals(by: dict) -> dict:
    queue, prefix, single = by["queue"], by["prefix"], by["single"]
    return {
        "hit_rate_vs_single": round(prefix["hit_rate"] / single["hit_rate"], 4)
        if single["hit_rate"]
        else None,
        "ttft_p50_cut": round(1 - prefix["ttft_ms_p50"] / queue["ttft_ms_p50"], 4),
        "ttft_p99_cut": round(1 - prefix["ttft_ms_p99"] / queue["ttft_ms_p99"], 4),
        "throughput_ratio": round(prefix["output_tok_s"] / queue["output_tok_s"], 4),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [f"{p['workers']} workers" for p in points]
    x = range(len(points))
    width = 0.27
    for k, (arm, color) in enumerate((("queue", "#999"), ("prefix", "#2a7"), ("single", "#37c"))):
        xs = [i + (k - 1) * width for i in x]
        axes[0].bar(xs, [p["arms"][arm]["hit_rate"] for p in points], width, label=arm, color=color)
    axes[0].set_title("prefix-cache hit rate")
    for k, (arm, color) in enumerate((("queue", "#999"), ("prefix", "#2a7"))):
        xs = [i + (k - 0.5) * width for i in x]
        p50 = [p["arms"][arm]["ttft_ms_p50"] for p in points]
        p99 = [p["arms"][arm]["ttft_ms_p99"] for p in points]
        axes[1].bar(xs, p50, width, label=f"{arm} p50", color=color)
        axes[1].scatter(xs, p99, marker="_", s=400, color="k", label="p99" if k == 0 else None)
        axes[2].bar(
            xs, [p["arms"][arm]["output_tok_s"] for p in points], width, label=arm, color=color
        )
    axes[1].set_title("TTFT (ms): bars p50, dashes p99")
    axes[1].set_yscale("log")
    axes[2].set_title("output tokens/s")
    for ax in axes:
        ax.set_xticks(list(x), labels)
        ax.legend(fontsize=8)
    wl = report["workload"]
    fig.suptitle(
        f"prefix routing, simulated {report['profile']}: {wl['users']} users x {wl['turns']} turns,"
        f" {wl['system_prompts']} system prompts of {wl['system_len']} tokens "
        f"(load avg {report['load_avg_start'][0]:.1f}, shared 2-core CPU)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="2,4", help="comma-separated worker counts")
    # An L4: prefill (what a cached prefix saves) dominates time to first token there, as
    # it does on any GPU under load; on an H100 the 8B model's prefill (~40 ms per 1k
    # tokens) is below what a shared 2-core host adds to every request.
    p.add_argument("--profile", default="l4-llama3-8b")
    p.add_argument("--users", type=int, default=24)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-prompts", type=int, default=4)
    p.add_argument("--system-len", type=int, default=512)
    p.add_argument("--user-len", type=int, default=192)
    p.add_argument("--reply-len", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="runs of each routing arm, alternated")
    p.add_argument("--blocks-per-worker", type=int, default=0,
                   help="KV blocks of 16 tokens per worker; 0: the workload's distinct blocks / "
                   "workers (the cluster holds the workload once, without duplicates)")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--load-tokens", type=float, default=64.0)
    p.add_argument("--route-fallback", type=float, default=1.0)
    p.add_argument("--stagger-ms", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small workload on 2 workers")
    p.add_argument("--model", help="model folder for the tokenizer (default: a tiny checkpoint)")
    p.add_argument("--out", default=str(RESULTS / "routing.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.users, args.turns, args.system_len, args.rounds = "2", 8, 3, 256, 1
    return args


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
    if args.model:
        model = args.model
    else:
        from tests.support.model_factory import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="jetserve-tiny-"))))
    cfg = json.loads((Path(model) / "config.json").read_text())
    chats = make_chats(args, int(cfg["vocab_size"]), reserved=8)
    working_set = distinct_blocks(chats, args)
    print(f"workload: {len(chats)} users x {args.turns} turns, {working_set} distinct blocks",
          flush=True)  # fmt: skip
    report = {
        "benchmark": "routing",
        "profile": args.profile,
        "machine": {**sb.machine(), "shared": "2-core x86_64 box shared with other jobs"},
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
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
                "seed",
                "rounds",
            )
        },
        "distinct_blocks": working_set,
        "points": [],
    }
    for workers in [int(w) for w in args.workers.split(",")]:
        blocks = args.blocks_per_worker or max(working_set // workers, 64)
        runs: dict[str, list[dict]] = {"queue": [], "prefix": [], "single": []}
        for r in range(args.rounds):
            # Alternate the order, so neither arm always runs while the machine is busier.
            for routing in ("queue", "prefix") if r % 2 == 0 else ("prefix", "queue"):
                runs[routing].append(run_arm(model, chats, args, workers, blocks, routing))
        runs["single"].append(run_arm(model, chats, args, 1, workers * blocks, "queue"))
        arms = {arm: mean_of(results) for arm, results in runs.items()}
        point = {
            "workers": workers,
            "blocks_per_worker": blocks,
            "arms": arms,
            "goals": goals(arms),
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
