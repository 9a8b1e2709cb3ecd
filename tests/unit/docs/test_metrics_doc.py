"""docs/metrics.md lists exactly the series each process registers: name, type, labels."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.api.gateway.metrics import gateway_metrics
from shared.metrics import api_metrics, new_registry, worker_metrics

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(jetserve:[a-z0-9_:]+)` \| (\w+) \| ([^|]*) \|")

Series = tuple[str, str, tuple[str, ...]]


def _registered(*groups: object) -> set[Series]:
    out = set()
    for group in groups:
        for f in fields(group):  # type: ignore[arg-type]
            m = getattr(group, f.name)
            name = m._name + ("_total" if m._type == "counter" else "")
            out.add((name, m._type, tuple(m._labelnames)))
    return out


def _documented(section: str) -> set[Series]:
    """Rows of the tables under `## {section}` (its ### subsections included)."""
    text = DOC.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    out = set()
    for line in body.splitlines():
        found = ROW.match(line)
        if found:
            name, kind, labels = found.groups()
            names = tuple(x.strip() for x in labels.split(",") if x.strip() not in ("", "-"))
            out.add((name, kind, names))
    return out


def test_api_section_lists_the_api_and_gateway_series() -> None:
    registry: CollectorRegistry = new_registry()
    code = _registered(api_metrics(registry), gateway_metrics(registry))
    doc = _documented("API")
    assert doc == code, f"only in the doc: {doc - code}; only in the code: {code - doc}"


def test_worker_section_lists_the_worker_series() -> None:
    code = _registered(worker_metrics(new_registry()))
    doc = _documented("Worker")
    assert doc == code, f"only in the doc: {doc - code}; only in the code: {code - doc}"


def test_no_series_is_registered_outside_the_two_metrics_modules() -> None:
    """The tests above read those modules; a series made anywhere else would escape them."""
    repo = DOC.parents[1]
    made = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(")
    homes = {repo / "shared" / "metrics.py", repo / "services" / "api" / "gateway" / "metrics.py"}
    found = [
        str(path.relative_to(repo))
        for top in ("shared", "services", "engine_worker")
        for path in (repo / top).rglob("*.py")
        if path not in homes and made.search(path.read_text())
    ]
    assert not found, f"metrics registered outside shared/metrics.py: {found}"
