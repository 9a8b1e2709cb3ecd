"""A tensor-parallel rank other than 0: build the engine's shard, then run rank 0's steps.

Started by parallel/launch.py, never by hand. It builds the same LLMEngine as rank 0 (so
loading, quantization and KV sizing are the same code), holds 1/N of the weights and of
the KV cache, and runs every forward pass rank 0 broadcasts until rank 0 says stop. It
exits when rank 0's process is gone, so no rank outlives its worker.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.llm_engine import LLMEngine
from engine_worker.engine.parallel.group import TensorParallel
from engine_worker.engine.parallel.launch import JOIN_TIMEOUT_S, rank_device

PARENT_POLL_S = 0.5
ORPHAN_EXIT_CODE = 3


def _exit_with_parent(parent_pid: int) -> None:
    """Reparented means rank 0 died (even by SIGKILL): leave at once."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(ORPHAN_EXIT_CODE)
        time.sleep(PARENT_POLL_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--load-format", required=True)
    ap.add_argument("--config", required=True, help="the engine config, as JSON")
    args = ap.parse_args(argv)
    threading.Thread(
        target=_exit_with_parent, args=(args.parent_pid,), name="parent-watch", daemon=True
    ).start()
    torch.set_num_threads(args.threads)
    config = EngineConfig.model_validate_json(args.config)
    device = rank_device(config.resolve_device(), args.rank)
    store = dist.TCPStore(
        "127.0.0.1",
        args.port,
        args.world_size,
        is_master=False,
        timeout=timedelta(seconds=JOIN_TIMEOUT_S),
    )
    store.set(f"rank{args.rank}/up", "1")
    tp = TensorParallel.join(store, args.rank, args.world_size, device)
    engine = LLMEngine(config, load_format=args.load_format, parallel=tp)
    engine.runner.follow()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
