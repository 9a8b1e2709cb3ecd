"""Rank 0 starts the other tensor-parallel ranks and watches them.

Each is a process running `engine_worker.engine.parallel.rank_main` with the same engine
config; they meet rank 0 over a TCP store on 127.0.0.1 (one node). A rank that exits is
an error rank 0 raises at its next check or collective: the engine cannot go on with a
piece of its model missing. Ranks exit by themselves when rank 0's process goes away.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.parallel.group import TensorParallel

log = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 300.0  # the ranks' interpreters start and import torch in this time


class RankFailed(RuntimeError):
    """A tensor-parallel rank died or never joined."""


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r of a CUDA engine uses cuda:r; CPU ranks share the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def threads_per_rank(device: torch.device, size: int) -> int:
    """CPU ranks split this process's intra-op threads (oversubscribed cores crawl)."""
    if device.type == "cuda":
        return torch.get_num_threads()
    return max(1, torch.get_num_threads() // size)


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


@dataclass
class RankProcesses:
    """Ranks 1..N-1 (at index rank - 1) and the store they met on."""

    procs: list[subprocess.Popen]
    store: dist.TCPStore

    def __post_init__(self) -> None:
        # However rank 0's engine goes (an error during its own start, a test that drops
        # it), its ranks go with it.
        self._finalizer = weakref.finalize(self, _kill, self.procs)

    def check(self, wait_s: float = 0.0) -> None:
        """Raise RankFailed if any rank has exited (or exits within `wait_s`: after a
        collective failed, the dead peer may not have been reaped yet)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None:
                    raise RankFailed(
                        f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}"
                    )
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def wait(self, timeout_s: float) -> None:
        """Wait for the ranks to exit (after the stop was sent); kill those that don't."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                log.warning("tensor-parallel rank pid %d did not stop; killing it", proc.pid)
        self.kill()

    def kill(self) -> None:
        self._finalizer()


def _await_ranks(store: dist.TCPStore, procs: list[subprocess.Popen]) -> None:
    keys = [f"rank{r}/up" for r in range(1, len(procs) + 1)]
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not store.check(keys):
        for rank, proc in enumerate(procs, start=1):
            if proc.poll() is not None:
                raise RankFailed(
                    f"tensor-parallel rank {rank} exited with code {proc.returncode} "
                    "before joining (its error is above)"
                )
        if time.monotonic() > deadline:
            raise RankFailed(f"tensor-parallel ranks did not join within {JOIN_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def launch_ranks(
    config: EngineConfig, load_format: str, device: torch.device
) -> tuple[RankProcesses, TensorParallel]:
    """Start ranks 1..N-1 and join them as rank 0; returns once all are connected."""
    size = config.tensor_parallel_size
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        size,
        is_master=True,
        timeout=timedelta(seconds=JOIN_TIMEOUT_S),
        wait_for_workers=False,
    )
    threads = threads_per_rank(device, size)
    torch.set_num_threads(threads)
    common = [
        sys.executable,
        "-m",
        "engine_worker.engine.parallel.rank_main",
        "--world-size",
        str(size),
        "--port",
        str(store.port),
        "--parent-pid",
        str(os.getpid()),
        "--threads",
        str(threads),
        "--load-format",
        load_format,
        "--config",
        config.model_dump_json(),
    ]
    procs = [subprocess.Popen([*common, "--rank", str(r)]) for r in range(1, size)]
    ranks = RankProcesses(procs, store)
    log.info(
        "tensor parallel: %d ranks (pids %s), %s, %d threads each",
        size,
        [os.getpid(), *(p.pid for p in procs)],
        device,
        threads,
    )
    try:
        _await_ranks(store, procs)
        tp = TensorParallel.join(store, 0, size, rank_device(device, 0))
    except BaseException:
        ranks.kill()
        raise
    return ranks, tp
