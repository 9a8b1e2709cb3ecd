"""Prometheus configs and the Grafana dashboard: valid, and every series a panel plots is
one the services (shared/metrics.py) or the NATS exporter actually export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.metrics import api_metrics, new_registry, worker_metrics
from tests.support.deploy_files import (
    GRAFANA_PROVISIONING,
    PROMETHEUS_CONFIGS,
    concrete_promql,
    dashboard,
    dashboard_exprs,
    metric_names_in,
)

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool absent (apt-get install -y prometheus)"
)

# Series from prometheus-nats-exporter (-jsz=all) and Prometheus itself.
EXTERNAL_SERIES = {"jetstream_consumer_num_pending", "up"}
REQUIRED_METRICS = {
    "jetserve:generation_tokens_total",
    "jetserve:prompt_tokens_total",
    "jetserve:time_to_first_token_seconds_bucket",
    "jetserve:time_per_output_token_seconds_bucket",
    "jetserve:e2e_request_latency_seconds_bucket",
    "jetserve:queue_depth",
    "jetserve:kv_cache_usage_perc",
    "jetserve:prefix_cache_hit_rate",
    "jetserve:num_requests_running",
    "jetserve:num_requests_waiting",
    "jetserve:workers",
    "jetstream_consumer_num_pending",
}


def _exported_series(registry_builder) -> set[str]:
    """Series names a registry exposes, by metric type (labelled metrics with no samples
    yet still define their names)."""
    registry = new_registry()
    registry_builder(registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, [""]):
            names.add(family.name + suffix)
    return names


WORKER_SERIES = _exported_series(worker_metrics)
API_SERIES = _exported_series(api_metrics)


def test_dashboard_plots_only_exported_series() -> None:
    for title, expr in dashboard_exprs():
        for name in metric_names_in(concrete_promql(expr)):
            assert name in WORKER_SERIES | API_SERIES | EXTERNAL_SERIES, (
                f"panel {title!r} plots {name}, which nothing exports"
            )


def test_dashboard_covers_the_serving_signals() -> None:
    used = set().union(*(metric_names_in(concrete_promql(e)) for _, e in dashboard_exprs()))
    assert used >= REQUIRED_METRICS, f"missing: {REQUIRED_METRICS - used}"
    quantiles = {
        float(q)
        for _, e in dashboard_exprs()
        for q in re.findall(r"histogram_quantile\(([\d.]+)", e)
    }
    assert quantiles == {0.5, 0.9, 0.99}


def test_job_filters_name_jobs_that_export_the_series() -> None:
    """`job="jetserve-worker"` must select the worker's series, `jetserve-api` the API's."""
    jobs = {"jetserve-worker": WORKER_SERIES, "jetserve-api": API_SERIES}
    for config in PROMETHEUS_CONFIGS:
        names = {j["job_name"] for j in yaml.safe_load(config.read_text())["scrape_configs"]}
        assert set(jobs) <= names, f"{config.name} lacks a job the dashboard filters on"
    for title, expr in dashboard_exprs():
        for job, series in jobs.items():
            for selector in re.findall(rf'([\w:]+)\{{[^}}]*job="{job}"', expr):
                assert selector in series | {"up"}, f"{title!r}: {job} does not export {selector}"


def test_dashboard_layout_and_datasource() -> None:
    dash = dashboard()
    datasource = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    ids, cells = set(), set()
    for panel in dash["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert panel["datasource"]["uid"] == datasource["uid"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
    (model_var,) = dash["templating"]["list"]
    assert model_var["name"] == "model" and model_var["allValue"] == ".*"


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "jetserve.yml").read_text())
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    target = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{target}:ro" in mounts


@needs_promtool
@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda p: p.name)
def test_prometheus_config_is_valid(config: Path) -> None:
    done = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each panel query as a recording rule: a syntax error fails here,
    not in front of someone reading the dashboard."""
    rules = [
        {"record": f"jetserve:panel_{i}", "expr": concrete_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
