"""The step's token bitmask: filled off the engine thread while the forward pass runs.

The grammar states a step needs are final once the previous step's tokens were
accepted, so the engine starts filling the mask rows of the constrained sequences that
sample this step before it calls the model, on one helper thread (xgrammar's fill runs
in C++ and releases the GIL, as torch's CPU and GPU ops do), and waits for it only when
the logits are ready. Free sequences in the same batch get no row and are untouched.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from engine_worker.engine.sequence import Sequence


@dataclass
class MaskTimes:
    steps: int = 0
    rows: int = 0
    fill_s: float = 0.0  # on the helper thread (overlapped with the forward pass)
    wait_s: float = 0.0  # what the engine thread waited for it after the forward pass
    apply_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        per = max(self.steps, 1)
        return {
            "steps": self.steps,
            "rows": self.rows,
            "fill_ms_per_step": 1e3 * self.fill_s / per,
            "wait_ms_per_step": 1e3 * self.wait_s / per,
            "apply_ms_per_step": 1e3 * self.apply_s / per,
        }


@dataclass
class PendingMask:
    """Rows (positions among the step's sampling sequences) and the bitmask being filled."""

    rows: list[int]
    bitmask: torch.Tensor
    future: Future[float]


@dataclass
class MaskFiller:
    vocab_size: int
    times: MaskTimes = field(default_factory=MaskTimes)
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
    )

    def start(self, samplers: list[Sequence]) -> PendingMask | None:
        """Begin filling rows for the constrained ones among this step's sampling sequences."""
        rows = [i for i, s in enumerate(samplers) if s.constraint is not None]
        if not rows:
            return None
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(samplers), self.vocab_size)
        constraints = [samplers[i].constraint for i in rows]

        def fill() -> float:
            t0 = time.perf_counter()
            for row, c in zip(rows, constraints, strict=True):
                c.fill(bitmask, row)
            return time.perf_counter() - t0

        return PendingMask(rows, bitmask, self._pool.submit(fill))

    def apply(self, pending: PendingMask | None, logits: torch.Tensor) -> None:
        """In place: forbidden tokens of constrained rows become -inf."""
        if pending is None:
            return
        import xgrammar as xgr

        t0 = time.perf_counter()
        fill_s = pending.future.result()
        t1 = time.perf_counter()
        bitmask = pending.bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(
            logits, bitmask, vocab_size=self.vocab_size, indices=pending.rows
        )
        t = self.times
        t.steps += 1
        t.rows += len(pending.rows)
        t.fill_s += fill_s
        t.wait_s += t1 - t0
        t.apply_s += time.perf_counter() - t1

    def close(self) -> None:
        self._pool.shutdown(wait=False)
