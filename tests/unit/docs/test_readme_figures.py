"""The README quotes the serving benchmark as its result files have it (both models, on
both boxes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _quoted(name: str) -> tuple[str, str]:
    """The ratios and added TTFTs at the file's concurrencies, as the README writes them."""
    rows = json.loads((REPO / "benchmarks" / "results" / name).read_text())["stack_vs_engine"]
    rows = sorted(rows, key=lambda r: r["concurrency"])
    ratios = " / ".join(f"{r['throughput_ratio']:.2f}" for r in rows)
    ttft = " / ".join(f"{r['added_ttft_ms_p50']:.0f}" for r in rows)
    return ratios, ttft


@pytest.mark.parametrize(
    "name",
    ["serving.json", "serving_50m.json", "serving_demo_amx.json", "serving_50m_amx.json"],
)
def test_readme_quotes_the_serving_results(name: str) -> None:
    readme = " ".join((REPO / "README.md").read_text().split())
    ratios, ttft = _quoted(name)
    assert f"{ratios} of the engine's throughput" in readme or f"{ratios}, adding" in readme, (
        f"README does not quote {name}'s throughput ratios {ratios}"
    )
    assert f"{ttft} ms" in readme, f"README does not quote {name}'s added TTFT {ttft} ms"
    assert f"benchmarks/results/{name}" in readme
