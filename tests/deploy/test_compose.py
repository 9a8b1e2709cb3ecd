"""docker-compose.yml and the GPU override: valid for `docker-compose config`, and the
topology properties the deployment relies on (health-gated start, scalable workers)."""

from __future__ import annotations

import pytest

from tests.support.deploy_files import (
    COMPOSE,
    COMPOSE_GPU,
    REPO,
    compose_config,
    compose_environment,
    docker_compose_binary,
    parse_compose_port,
    raw_compose,
)

needs_compose = pytest.mark.skipif(
    docker_compose_binary() is None,
    reason="docker-compose binary absent (apt-get install -y docker-compose)",
)

EXPECTED_SERVICES = {
    "nats",
    "nats-exporter",
    "model-init",
    "model-push",
    "api",
    "worker",
    "prometheus",
    "grafana",
}


@pytest.fixture(scope="module")
def cpu_config() -> dict:
    return compose_config(COMPOSE)


@pytest.fixture(scope="module")
def gpu_config() -> dict:
    return compose_config(COMPOSE, COMPOSE_GPU)


@needs_compose
def test_compose_config_is_valid_and_complete(cpu_config: dict) -> None:
    assert set(cpu_config["services"]) == EXPECTED_SERVICES
    assert set(cpu_config["volumes"]) >= {"nats-data", "models", "prometheus-data", "grafana-data"}


@needs_compose
def test_long_running_services_have_healthchecks(cpu_config: dict) -> None:
    services = cpu_config["services"]
    # nats-exporter's image has no shell or HTTP client; model-init exits by design.
    for name in ("nats", "api", "worker", "prometheus", "grafana"):
        check = services[name].get("healthcheck")
        assert check and check["test"][0] == "CMD", f"{name} has no exec healthcheck"


@needs_compose
def test_start_order_is_gated_on_health(cpu_config: dict) -> None:
    services = cpu_config["services"]
    assert services["api"]["depends_on"]["nats"]["condition"] == "service_healthy"
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["nats"]["condition"] == "service_healthy"
    assert worker_deps["model-push"]["condition"] == "service_completed_successfully"
    push_deps = services["model-push"]["depends_on"]
    assert push_deps["model-init"]["condition"] == "service_completed_successfully"
    assert push_deps["nats"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["nats-exporter"]["depends_on"]["nats"]["condition"] == "service_healthy"


@needs_compose
def test_worker_can_scale(cpu_config: dict) -> None:
    """`--scale worker=3` fails on a fixed container name or a published host port."""
    worker = cpu_config["services"]["worker"]
    assert "container_name" not in worker
    for spec in worker.get("ports", []):
        host, _ = parse_compose_port(spec)
        assert host is None, f"worker publishes host port {host}: replicas would collide"
    assert not worker.get("volumes"), "workers fetch the model from NATS: no shared volume"


@needs_compose
def test_nats_keeps_jetstream_on_a_volume(cpu_config: dict) -> None:
    nats = cpu_config["services"]["nats"]
    assert any(v.startswith("nats-data:/data") for v in nats["volumes"])
    # Clients and the monitoring port stay on the compose network (docs/security.md, 1b).
    assert not nats.get("ports"), nats.get("ports")
    assert "-jsz=all" in cpu_config["services"]["nats-exporter"]["command"]


@needs_compose
def test_cpu_default_runs_the_demo_model(cpu_config: dict) -> None:
    worker = cpu_config["services"]["worker"]
    init = cpu_config["services"]["model-init"]
    push = cpu_config["services"]["model-push"]["command"]
    assert worker["build"]["target"] == "cpu"
    assert worker["environment"]["JETSERVE_DEVICE"] == "cpu"
    out = init["command"][init["command"].index("--out") + 1]
    assert push[:3] == ["models", "push", out] == ["models", "push", "/models/jetserve-demo"]
    model = worker["command"][worker["command"].index("--model") + 1]
    assert model == push[push.index("--name") + 1] == "jetserve-demo"
    assert "deploy" not in worker


@needs_compose
def test_gpu_override_reserves_a_gpu_per_worker(gpu_config: dict) -> None:
    worker = gpu_config["services"]["worker"]
    assert worker["build"]["target"] == "cuda"
    assert worker["environment"]["JETSERVE_DEVICE"] == "cuda"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # The override changes the worker only; the rest of the topology is the CPU one.
    assert gpu_config["services"]["api"] == compose_config(COMPOSE)["services"]["api"]


def test_mounted_config_files_exist() -> None:
    """Every ./path bind-mounted by compose is a file in the repository (no Docker needed)."""
    for name, service in raw_compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if isinstance(build, dict):
            dockerfile = REPO / build.get("context", ".") / build["dockerfile"]
            assert dockerfile.exists(), f"{name} builds from missing {dockerfile}"
            if "target" in build:
                assert f" AS {build['target']}\n" in dockerfile.read_text(), (
                    f"{dockerfile.name} has no stage {build['target']!r}"
                )


def test_gpu_worker_sizes_its_kv_cache_by_gpu_memory_utilization() -> None:
    """The CPU file pins a 256 MiB cache; the GPU override must not inherit it (no Docker)."""
    from shared.settings import EngineSettings

    gpu = EngineSettings.from_env(compose_environment("worker", (COMPOSE, COMPOSE_GPU)))
    assert gpu.kv_cache_memory is None
    assert gpu.gpu_memory_utilization == 0.9
    cpu = EngineSettings.from_env(compose_environment("worker", (COMPOSE,)))
    assert cpu.kv_cache_memory == 256 * 1024 * 1024
