"""Draw the Grafana dashboard's panels from a real Prometheus, with matplotlib.

A stand-in for a Grafana screenshot where Grafana cannot be installed: it reads
deploy/grafana/dashboards/jetserve.json, sends every panel's PromQL (Grafana variables
filled in) to Prometheus' query_range API, and plots the answers in the dashboard's own
grid layout. The image says on its face that it is this stand-in.

    python deploy/grafana/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --minutes 10 --out docs/images/jetserve-dashboard.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt

DASHBOARD = Path(__file__).parent / "dashboards" / "jetserve.json"
GRID_COLUMNS = 24
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff"]


@dataclass
class Series:
    label: str
    times: list[datetime]
    values: list[float]


def fill_variables(expr: str, rate_interval: str, variables: dict[str, str]) -> str:
    """Grafana's variables as Grafana would expand them for an 'All' selection."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} placeholders filled from the series' labels."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return " ".join(text.split()) or json.dumps(labels)


def query_range(
    client: httpx.Client, expr: str, start: float, end: float, step: float
) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
    r = client.get(
        "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}
    )
    r.raise_for_status()
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus rejected {expr!r}: {body}")
    return [
        (item["metric"], [(float(t), float(v)) for t, v in item["values"]])
        for item in body["data"]["result"]
    ]


def panel_series(
    client: httpx.Client,
    panel: dict,
    window: tuple[float, float, float],
    rate_interval: str,
    variables: dict[str, str],
) -> list[Series]:
    out = []
    start, end, step = window
    for target in panel.get("targets", []):
        expr = fill_variables(target["expr"], rate_interval, variables)
        for labels, points in query_range(client, expr, start, end, step):
            finite = [(t, v) for t, v in points if v == v and abs(v) != float("inf")]
            out.append(
                Series(
                    legend(target.get("legendFormat", ""), labels),
                    [datetime.fromtimestamp(t) for t, _ in finite],
                    [v for _, v in finite],
                )
            )
    return out


def format_value(value: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "reqps":
        return f"{value:.2f} req/s"
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def _style(ax: plt.Axes, title: str) -> None:
    ax.set_facecolor(PANEL)
    ax.set_title(title, loc="left", color=TEXT, fontsize=10, pad=6)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.tick_params(colors=TEXT, labelsize=7)


def draw_timeseries(
    ax: plt.Axes, panel: dict, series: list[Series], window: tuple[float, float, float]
) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "short")
    scale = 100.0 if unit == "percentunit" else 1.0
    for i, s in enumerate(series):
        ax.plot(
            s.times,
            [v * scale for v in s.values],
            color=PALETTE[i % len(PALETTE)],
            linewidth=1.4,
            label=s.label,
        )
    if "min" in defaults:
        ax.set_ylim(bottom=defaults["min"] * scale)
    if "max" in defaults:
        ax.set_ylim(top=defaults["max"] * scale)
    ylabel = {"percentunit": "%", "s": "seconds", "reqps": "req/s"}.get(unit, "")
    ax.set_ylabel(ylabel, color=TEXT, fontsize=7)
    ax.grid(color=GRID, linewidth=0.5)
    locator = mdates.AutoDateLocator(minticks=4, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.set_xlim(datetime.fromtimestamp(window[0]), datetime.fromtimestamp(window[1]))
    if series:
        ax.legend(loc="upper left", fontsize=6, facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT)
    else:
        ax.text(0.5, 0.5, "no data", color=TEXT, ha="center", va="center", transform=ax.transAxes)


def draw_stat(
    ax: plt.Axes, panel: dict, series: list[Series], window: tuple[float, float, float]
) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    ax.set_xticks([])
    ax.set_yticks([])
    if not series:
        ax.text(0.5, 0.45, "no data", color=TEXT, ha="center", va="center", transform=ax.transAxes)
        return
    for i, s in enumerate(series[:3]):
        if not s.values:
            continue
        spark = ax.inset_axes([0.0, 0.0, 1.0, 0.35])
        spark.fill_between(range(len(s.values)), s.values, color="#73bf69", alpha=0.25)
        spark.set_axis_off()
        y = 0.62 - i * 0.22
        ax.text(
            0.5,
            y,
            format_value(s.values[-1], unit),
            color="#73bf69",
            fontsize=18,
            fontweight="bold",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.text(
            0.5,
            y - 0.14,
            s.label,
            color=TEXT,
            fontsize=7,
            ha="center",
            va="center",
            transform=ax.transAxes,
        )


def render(
    dashboard: dict,
    prometheus: str,
    out: Path,
    minutes: float,
    end: float | None = None,
    step: float = 5.0,
    rate_interval: str = "1m",
) -> Path:
    end = end or time.time()
    window = (end - minutes * 60, end, step)
    variables = {v["name"]: v.get("allValue") or ".*" for v in dashboard["templating"]["list"]}
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width_in = 20.0
    height_in = rows * width_in / GRID_COLUMNS * 0.55 + 0.9
    fig = plt.figure(figsize=(width_in, height_in), facecolor=BACKGROUND)
    top = 1 - 0.9 / height_in
    fig.suptitle(
        f"{dashboard['title']} dashboard  |  {datetime.fromtimestamp(window[0]):%Y-%m-%d %H:%M}"
        f" - {datetime.fromtimestamp(end):%H:%M}  |  every panel's PromQL evaluated by "
        "Prometheus, drawn with matplotlib (stand-in for a Grafana screenshot)",
        color=TEXT,
        fontsize=11,
        x=0.01,
        ha="left",
        y=1 - 0.3 / height_in,
    )
    with httpx.Client(base_url=prometheus, timeout=30) as client:
        for panel in panels:
            g = panel["gridPos"]
            pad_x, pad_y = 0.006, 0.012
            left = g["x"] / GRID_COLUMNS + pad_x + (0.025 if panel["type"] == "timeseries" else 0)
            width = (
                g["w"] / GRID_COLUMNS - 2 * pad_x - (0.025 if panel["type"] == "timeseries" else 0)
            )
            bottom = (
                top * (1 - (g["y"] + g["h"]) / rows)
                + pad_y
                + (0.02 if panel["type"] == "timeseries" else 0)
            )
            height = (
                top * g["h"] / rows
                - 2 * pad_y
                - (0.035 if panel["type"] == "timeseries" else 0.015)
            )
            ax = fig.add_axes((left, bottom, width, height))
            _style(ax, panel["title"])
            series = panel_series(client, panel, window, rate_interval, variables)
            draw = draw_stat if panel["type"] == "stat" else draw_timeseries
            draw(ax, panel, series, window)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=BACKGROUND)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    p.add_argument("--minutes", type=float, default=15.0, help="time range ending now")
    p.add_argument("--end", type=float, help="end of the range, unix seconds (default now)")
    p.add_argument("--step", type=float, default=5.0, help="query resolution in seconds")
    p.add_argument("--rate-interval", default="1m", help="value for $__rate_interval")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    out = render(
        json.loads(args.dashboard.read_text()),
        args.prometheus,
        args.out,
        args.minutes,
        args.end,
        args.step,
        args.rate_interval,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
