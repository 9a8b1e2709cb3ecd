"""What `sync_interval: always` costs: acknowledged JetStream publishes with and without
an fsync before each acknowledgement (docs/durability.md).

Jepsen's NATS 2.12.1 analysis (2025-12-08) showed the default (fsync every 2 minutes)
losing acknowledged writes on an OS crash or power failure combined with other faults.
This measures the price of closing that window on this machine's disk: one publisher
(latency of an acked publish, what a worker's per-step Delta waits for) and 32
concurrent publishers (throughput), Delta-sized messages (256 B), against a real
nats-server per setting.

    python benchmarks/nats_sync_bench.py [--messages 2000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from services.launcher import nats_server_binary, wait_for_port
from tests.support.nats_process import free_port

PAYLOAD = b"x" * 256
SETTINGS = ("default", "always")


async def _measure(url: str, messages: int, concurrency: int) -> dict:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH", subjects=["bench.>"])
    latencies: list[float] = []

    async def publisher(i: int, count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            await js.publish(f"bench.{i}", PAYLOAD)
            latencies.append(time.perf_counter() - t0)

    per = messages // concurrency
    t0 = time.perf_counter()
    await asyncio.gather(*(publisher(i, per) for i in range(concurrency)))
    took = time.perf_counter() - t0
    await js.delete_stream("BENCH")
    await nc.close()
    latencies.sort()
    return {
        "publishers": concurrency,
        "messages": per * concurrency,
        "msgs_per_s": round(per * concurrency / took, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1e3, 3),
    }


def run_setting(setting: str, messages: int) -> list[dict]:
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as store:
        port = free_port()
        sync = "" if setting == "default" else f"\n  sync_interval: {setting}"
        conf = Path(store) / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {json.dumps(store)}{sync}\n}}\n"
        )
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)])
        try:
            wait_for_port(port, proc, 10)
            url = f"nats://127.0.0.1:{port}"
            return [
                {"sync_interval": setting, **asyncio.run(_measure(url, messages, c))}
                for c in (1, 32)
            ]
        finally:
            proc.terminate()
            proc.wait(10)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, publishers in zip(axes, (1, 32), strict=True):
        sel = [r for r in rows if r["publishers"] == publishers]
        ax.bar([r["sync_interval"] for r in sel], [r["msgs_per_s"] for r in sel])
        ax.set_title(f"{publishers} publisher(s): acked publishes/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = [row for setting in SETTINGS for row in run_setting(setting, args.messages)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}; shared 2-core box",
        "nats_server": subprocess.run(
            [nats_server_binary(), "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "rows": rows,
    }
    (out / "nats_sync_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "nats_sync_bench.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
