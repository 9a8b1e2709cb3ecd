"""Readers for the deployment files tests/deploy checks.

One place that knows where compose, Kubernetes, NATS, Prometheus and Grafana files live
and how to pull env var names, ports and commands out of them, so each test states
only the property it checks.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from services.config_reference import env_names
from tests.support.paths import REPO_ROOT

REPO = REPO_ROOT
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
NATS_CONF = DEPLOY / "nats" / "nats.conf"
NATS_CLUSTER_CONF = DEPLOY / "nats" / "cluster.conf"
PROMETHEUS_CONFIGS = sorted((DEPLOY / "prometheus").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "jetserve.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"


def load_script(path: Path) -> ModuleType:
    """A script under deploy/ (not a package) as a module, without touching sys.path."""
    name = f"deploy_script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the body runs
    spec.loader.exec_module(module)
    return module


ENV_NAME = re.compile(r"\bJETSERVE_[A-Z0-9_]+\b")


def docker_compose_binary() -> str | None:
    return shutil.which("docker-compose")


def compose_config(*files: Path) -> dict[str, Any]:
    """The merged, interpolated model that `docker-compose config` prints."""
    binary = docker_compose_binary()
    assert binary is not None
    args = [binary]
    for f in files:
        args += ["-f", str(f)]
    done = subprocess.run(
        [*args, "config"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def raw_compose(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_environment(service: str, files: tuple[Path, ...] = (COMPOSE,)) -> dict[str, str]:
    """A compose service's environment, later files overriding earlier ones as with
    `-f a -f b`, and `${VAR:-default}` taken at its default, as `docker compose up` sees
    it when nothing is exported (no Docker needed)."""
    merged: dict[str, str] = {}
    for path in files:
        service_def = (raw_compose(path)["services"] or {}).get(service) or {}
        merged.update({k: str(v) for k, v in service_def.get("environment", {}).items()})
    return {k: _COMPOSE_VAR.sub(lambda m: m.group(2) or "", v) for k, v in merged.items()}


@dataclass(frozen=True)
class K8sDoc:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.doc["kind"]

    @property
    def name(self) -> str:
        return self.doc["metadata"]["name"]


def k8s_documents() -> list[K8sDoc]:
    """Every resource in deploy/k8s, the kustomization file excepted."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append(K8sDoc(path, doc))
    return docs


def k8s_by_kind(kind: str) -> list[K8sDoc]:
    return [d for d in k8s_documents() if d.kind == kind]


def pod_specs() -> Iterator[tuple[K8sDoc, dict[str, Any]]]:
    for d in k8s_documents():
        if d.kind in ("Deployment", "StatefulSet", "Job"):
            yield d, d.doc["spec"]["template"]["spec"]


def settings_env_names() -> set[str]:
    """JETSERVE_* names some `jetserve` command reads, from the settings declarations as
    the CLI builds them (the same source as docs/configuration.md)."""
    return env_names()


def deployment_texts() -> dict[Path, str]:
    """Every deployment file that may name a JETSERVE_* variable."""
    paths = [COMPOSE, COMPOSE_GPU, *DOCKERFILES, *sorted(K8S.glob("*.yaml"))]
    return {p: p.read_text() for p in paths}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def concrete_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, as Prometheus would get it."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*")


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*+)(?!\s*\()")
_PROMQL_WORDS = {"bool", "offset", "and", "or", "unless", "inf", "nan"}


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left once grouping clauses,
    label matchers and function calls are taken out."""
    bare = _MATCHERS.sub("", _GROUPING.sub("", expr))
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors like [1m]
    return {n for n in _IDENT.findall(bare) if n.lower() not in _PROMQL_WORDS}


def parse_compose_port(spec: str | int | dict) -> tuple[int | None, int]:
    """(host port or None, container port) of a compose `ports:` entry, short or long form
    (`docker-compose config` prints the long one)."""
    if isinstance(spec, dict):
        published = spec.get("published")
        return (int(published) if published is not None else None), int(spec["target"])
    spec = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(spec))  # `${VAR:-default}`: the default
    parts = spec.split("/")[0].split(":")
    container = int(parts[-1])
    host = int(parts[-2]) if len(parts) >= 2 else None
    return host, container
