"""Every env var, port and command the deployment files use exists in the code.

The names and defaults come from the settings declarations (shared/settings/) as the
`jetserve` CLI builds them; compose, the Kubernetes manifests, the Dockerfiles, the NATS
and Prometheus configs must agree.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from services.cli import SUBCOMMANDS, build_parser
from shared.settings import DEFAULT_NATS_URL, ApiSettings, LauncherSettings, WorkerSettings
from tests.support.deploy_files import (
    COMPOSE,
    COMPOSE_GPU,
    DEPLOY,
    DOCKERFILES,
    ENV_NAME,
    NATS_CLUSTER_CONF,
    NATS_CONF,
    REPO,
    deployment_texts,
    k8s_by_kind,
    parse_compose_port,
    pod_specs,
    raw_compose,
    settings_env_names,
)

API_PORT = ApiSettings().port
WORKER_PORT = WorkerSettings().metrics_port
NATS_CLIENT_PORT = urlparse(DEFAULT_NATS_URL).port


def test_settings_defaults_are_the_documented_ports() -> None:
    assert (API_PORT, WORKER_PORT, NATS_CLIENT_PORT) == (8000, 8001, 4222)


def test_launcher_runs_the_topology_on_the_same_ports() -> None:
    """`jetserve up` (no Docker) listens where compose and prometheus.launcher.yml expect."""
    launcher = LauncherSettings()
    assert (launcher.port, launcher.metrics_port, launcher.nats_port) == (
        API_PORT,
        WORKER_PORT,
        NATS_CLIENT_PORT,
    )


@pytest.mark.parametrize("path", list(deployment_texts()), ids=lambda p: str(p.relative_to(REPO)))
def test_env_vars_exist_in_settings(path: Path) -> None:
    used = set(ENV_NAME.findall(path.read_text()))
    unknown = used - settings_env_names()
    assert not unknown, f"{path.name} sets variables no jetserve setting declares: {unknown}"


def test_docs_only_name_real_env_vars() -> None:
    docs = REPO / "docs" / "deploy.md"
    unknown = set(ENV_NAME.findall(docs.read_text())) - settings_env_names()
    assert not unknown, f"docs/deploy.md names unknown variables: {unknown}"


def _conf_value(path: Path, key: str) -> str:
    match = re.search(rf"^\s*{key}\s*:\s*(\S+)", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} has no {key}"
    return match.group(1)


def test_nats_configs_use_the_standard_ports() -> None:
    for conf in (NATS_CONF, NATS_CLUSTER_CONF):
        assert int(_conf_value(conf, "port")) == NATS_CLIENT_PORT
        assert int(_conf_value(conf, "http_port")) == 8222
    cluster_block = NATS_CLUSTER_CONF.read_text().split("cluster {", 1)[1]
    assert re.search(r"^\s*port:\s*6222\s*$", cluster_block, re.MULTILINE)


def _compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return {k: str(v) for k, v in env.items()}


def test_compose_ports_match_settings() -> None:
    services = raw_compose()["services"]
    api, worker, nats = services["api"], services["worker"], services["nats"]
    assert {parse_compose_port(p)[1] for p in api["ports"]} == {API_PORT}
    assert _compose_env(api)["JETSERVE_API_PORT"] == str(API_PORT)
    assert [int(p) for p in worker["expose"]] == [WORKER_PORT]
    assert _compose_env(worker)["JETSERVE_WORKER_METRICS_PORT"] == str(WORKER_PORT)
    assert f":{API_PORT}/health" in " ".join(api["healthcheck"]["test"])
    assert f":{WORKER_PORT}/health" in " ".join(worker["healthcheck"]["test"])
    nats_url = urlparse(_compose_env(api)["JETSERVE_NATS_URL"])
    assert nats_url.hostname == "nats" and nats_url.port == NATS_CLIENT_PORT
    # NATS is reachable on the compose network only: nothing published on the host.
    assert "ports" not in nats and str(NATS_CLIENT_PORT) in nats["expose"]


def test_prometheus_scrapes_the_service_ports() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["jetserve-api"]["dns_sd_configs"][0] == {
        "names": ["api"],
        "type": "A",
        "port": API_PORT,
        "refresh_interval": "10s",
    }
    assert jobs["jetserve-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["jetserve-worker"]["dns_sd_configs"][0]["port"] == WORKER_PORT
    exporter = raw_compose()["services"]["nats-exporter"]["command"]
    assert jobs["nats"]["static_configs"][0]["targets"] == [
        f"nats-exporter:{exporter[exporter.index('-port') + 1]}"
    ]
    local = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.launcher.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in local["scrape_configs"]}
    assert targets["jetserve-api"] == [f"127.0.0.1:{API_PORT}"]
    assert targets["jetserve-worker"] == [f"127.0.0.1:{WORKER_PORT}"]


def test_k8s_ports_match_settings() -> None:
    for d, spec in pod_specs():
        container = spec["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if d.name == "api":
            assert ports == {"http": API_PORT}
            assert env["JETSERVE_API_PORT"] == str(API_PORT)
        elif d.name.startswith("worker-"):
            assert ports == {"metrics": WORKER_PORT}
            assert env["JETSERVE_WORKER_METRICS_PORT"] == str(WORKER_PORT)
            assert d.doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == (
                str(WORKER_PORT)
            )
        elif d.name == "nats":
            assert ports == {"client": NATS_CLIENT_PORT, "cluster": 6222, "monitor": 8222}
    (config,) = [d for d in k8s_by_kind("ConfigMap") if d.name == "jetserve-config"]
    url = urlparse(config.doc["data"]["JETSERVE_NATS_URL"])
    (svc,) = [d for d in k8s_by_kind("Service") if d.name == url.hostname]
    assert [p["port"] for p in svc.doc["spec"]["ports"]] == [url.port]


def test_dockerfiles_expose_the_service_ports() -> None:
    texts = {p.name: p.read_text() for p in DOCKERFILES}
    assert f"EXPOSE {API_PORT}\n" in texts["api.Dockerfile"]
    assert f"JETSERVE_API_PORT={API_PORT}" in texts["api.Dockerfile"]
    assert f"EXPOSE {WORKER_PORT}\n" in texts["worker.Dockerfile"]
    assert f"JETSERVE_WORKER_METRICS_PORT={WORKER_PORT}" in texts["worker.Dockerfile"]


def _commands() -> list[tuple[str, list[str]]]:
    """(where, jetserve argv) for every command the deployment files run."""
    found = []
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in (yaml.safe_load(path.read_text())["services"] or {}).items():
            image = str(service.get("image", ""))
            if "command" in service and image.startswith("jetserve-"):
                cmd = service["command"]
                found.append(
                    (f"{path.name}:{name}", cmd if isinstance(cmd, list) else shlex.split(cmd))
                )
    for d, spec in pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["image"].startswith("jetserve-"):
                found.append((f"{d.path.name}:{c['name']}", c["args"]))
    for dockerfile in DOCKERFILES:
        for match in re.finditer(r"^CMD (\[.*\])$", dockerfile.read_text(), re.MULTILINE):
            found.append((dockerfile.name, yaml.safe_load(match.group(1))))
    return found


@pytest.mark.parametrize("where,argv", _commands(), ids=[w for w, _ in _commands()])
def test_commands_are_real_cli_invocations(where: str, argv: list[str]) -> None:
    assert argv[0] in SUBCOMMANDS, f"{where}: `jetserve {argv[0]}` is no subcommand"
    module_name = SUBCOMMANDS[argv[0]][0]
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} (jetserve {argv[0]}) is not in the tree yet")
    parser, _ = build_parser(argv)
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `jetserve {' '.join(argv)}` is rejected by the CLI ({e})")


def test_images_run_the_jetserve_entry_point() -> None:
    for dockerfile in DOCKERFILES:
        assert 'ENTRYPOINT ["jetserve"]' in dockerfile.read_text(), dockerfile.name
