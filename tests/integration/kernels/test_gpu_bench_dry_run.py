"""The GPU benchmark script stays runnable: its --dry-run does every step at tiny CPU shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT


def test_dry_run_writes_results_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_decode_bench.py"),
            "--dry-run",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},  # CPU tensors, even on a GPU host
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["concurrency"] for r in results["throughput"]] == [1, 2, 4]
    assert all(r["output_tokens"] == r["concurrency"] * 8 for r in results["throughput"])
    b1 = results["batch1_decode"]
    assert b1["steps"] == 7 and b1["median_s"] > 0 and b1["roofline_s"] > 0
    assert results["copy_bandwidth"]["gb_per_s"] > 0
    for case in results["attention_kernel"]:
        assert case["max_abs_err_vs_reference"] < 1e-4
        assert case["triton_gb_per_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
