"""The attention benchmark's measuring step: both arms time the same tensors, and a row
says what it timed (shape, bytes, per-unit time, GFLOP/s)."""

from __future__ import annotations

import pytest
import torch

from jetserve_kernels.cpu.build import cpu_ops
from jetserve_kernels.cpu.ops import available

pytestmark = pytest.mark.skipif(not available(), reason="the C++ CPU kernels do not build here")


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_measure_times_both_arms_on_one_batch(model_dtype: torch.dtype) -> None:
    from benchmarks.cpu_attention_bench import measure

    shape = ("2x40 4/2x16", 2, 40, 4, 2, 16)
    evict = torch.zeros(1024)
    # This checkout's own ops stand in for an older build: same contract, no compile.
    dtypes = (model_dtype, torch.bfloat16)
    rows = measure(shape, dtypes, reps=3, evict=evict, before=cpu_ops())
    assert set(rows) == {"after", "before"}
    for row in rows.values():
        assert row["shape"] == "2x40 4/2x16" and row["cache_dtype"] == "bfloat16"
        assert row["model_dtype"] == str(model_dtype).removeprefix("torch.")
        assert row["kv_bytes"] == 2 * 2 * 40 * 2 * 16 * 2
        assert row["warm_us"] > 0 and row["cold_us"] > 0
        # 2 sequences x 2 KV heads x 3 groups of 16 positions
        assert row["warm_ns_per_unit"] == pytest.approx(row["warm_us"] * 1e3 / 12, rel=0.01)
        flops = 4 * 2 * 4 * 40 * 16
        # Both figures are rounded (0.1 us, 0.1 GFLOP/s): the time's rounding moves the
        # rate by up to 0.05 us of a few-us call.
        expected = flops / row["warm_us"] / 1e3
        assert row["warm_gflop_s"] == pytest.approx(
            expected, abs=expected * 0.05 / row["warm_us"] + 0.05
        )
