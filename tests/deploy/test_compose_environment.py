"""The API and worker run with exactly the environment docker-compose.yml gives them
(real processes, real nats-server, no Docker): both come up healthy and ready, serve a
completion, and export every series the dashboard plots under the labels it filters on.
With a CUDA device the worker also runs with docker-compose.gpu.yml's environment.

Only what cannot hold outside a container is changed: the NATS URL, free ports instead
of 8000/8001, a temporary data dir, and a tiny test checkpoint for the demo model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.support.deploy_files import (
    COMPOSE,
    COMPOSE_GPU,
    compose_environment,
    concrete_promql,
    dashboard_exprs,
    metric_names_in,
)
from tests.support.nats_process import NatsServer, free_port

START_TIMEOUT_S = 120.0


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env={**base, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )


def _wait_ok(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: process exited\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not 200 after {START_TIMEOUT_S}s\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


API_KEY = "sk-deploy-test-0123456789abcdef"
VARIANTS = {
    "cpu": (COMPOSE,),
    "gpu": (COMPOSE, COMPOSE_GPU),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def compose_like_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path
) -> Iterator[dict[str, str]]:
    files = VARIANTS[request.param]
    if request.param == "gpu" and not torch.cuda.is_available():
        pytest.skip("docker-compose.gpu.yml's worker environment needs a CUDA device")
    root = tmp_path_factory.mktemp(f"compose-env-{request.param}")
    # Secured as compose's nats: the generated identities; each service keeps the
    # JETSERVE_NATS_USER compose gives it, its password file is the one made here.
    nats_server = NatsServer(root / "nats", secured=True)
    nats_server.start()
    api_port, worker_port = free_port(), free_port()
    here = {"JETSERVE_NATS_URL": nats_server.url, "JETSERVE_DATA_DIR": str(root / "data")}
    worker_env = {
        **compose_environment("worker", files),
        "JETSERVE_NATS_PASSWORD_FILE": str(nats_server.auth_dir / "worker.password"),
        **here,
        "JETSERVE_WORKER_METRICS_PORT": str(worker_port),
    }
    api_env = {
        **compose_environment("api", files),
        **here,
        "JETSERVE_API_PORT": str(api_port),
        "JETSERVE_NATS_PASSWORD_FILE": str(nats_server.auth_dir / "api.password"),
    }
    api_env["JETSERVE_API_HOST"] = "127.0.0.1"
    assert api_env["JETSERVE_AUTH"] == "1"  # compose turns API keys on; seed one here
    api_env["JETSERVE_API_KEYS"] = f"deploy-test={API_KEY}"
    # compose runs `worker --model /models/jetserve-demo`; the same flag, a local folder.
    worker = _spawn(["worker", "--model", str(tiny_llama)], worker_env, root / "worker.log")
    api = _spawn(["api"], api_env, root / "api.log")
    try:
        _wait_ok(f"http://127.0.0.1:{worker_port}/health", worker, root / "worker.log")
        _wait_ok(f"http://127.0.0.1:{api_port}/ready", api, root / "api.log")
        yield {
            "nats_url": nats_server.url,
            "api": f"http://127.0.0.1:{api_port}",
            "worker": f"http://127.0.0.1:{worker_port}",
            "model": worker_env["JETSERVE_MODEL_NAME"],
            # The API container's NATS identity (what `docker compose exec api` runs as).
            "nats_user": api_env["JETSERVE_NATS_USER"],
            "nats_password_file": api_env["JETSERVE_NATS_PASSWORD_FILE"],
        }
    finally:
        _stop(api)
        _stop(worker)
        nats_server.stop()


def test_a_key_created_as_deploy_md_says_opens_the_api(
    compose_like_stack: dict[str, str],
) -> None:
    """docs/deploy.md: compose turns auth on; `docker compose exec api jetserve keys create
    --name me` (the API container's environment reaches NATS) makes a key that works at once."""
    api, model = compose_like_stack["api"], compose_like_stack["model"]
    body = {"model": model, "prompt": "Hello", "max_tokens": 2}
    r = httpx.post(f"{api}/v1/completions", json=body, timeout=30)
    assert r.status_code == 401, r.text
    assert "jetserve keys create" in r.json()["error"]["message"]
    env = {
        "JETSERVE_NATS_URL": compose_like_stack["nats_url"],
        "JETSERVE_NATS_USER": compose_like_stack["nats_user"],
        "JETSERVE_NATS_PASSWORD_FILE": compose_like_stack["nats_password_file"],
    }
    created = subprocess.run(
        [sys.executable, "-m", "services.cli", "keys", "create", "--name", "me", "--json"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")}, **env},
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    import json

    key = json.loads(created.stdout)["key"]
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 10  # every replica picks the key up from its watch
    while (r := httpx.post(f"{api}/v1/completions", json=body, headers=headers, timeout=60))\
            .status_code == 401 and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def _series(url: str) -> dict[str, list[dict[str, str]]]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def test_probe_endpoints_answer(compose_like_stack: dict[str, str]) -> None:
    """The paths compose healthchecks and the k8s probes use."""
    api, worker = compose_like_stack["api"], compose_like_stack["worker"]
    for url in (
        f"{api}/health",
        f"{api}/ready",
        f"{api}/metrics",
        f"{worker}/health",
        f"{worker}/metrics",
    ):
        assert httpx.get(url, timeout=5).status_code == 200, url
    ready = httpx.get(f"{api}/ready", timeout=5).json()
    assert compose_like_stack["model"] in ready["models"]


def test_dashboard_series_exist_with_model_labels(compose_like_stack: dict[str, str]) -> None:
    api, model = compose_like_stack["api"], compose_like_stack["model"]
    r = httpx.post(
        f"{api}/v1/completions",
        json={"model": model, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    # Prometheus scrapes every few seconds; the API refreshes its registry gauges every
    # second. So a series counts as exported once some scrape within a few seconds has it.
    deadline = time.monotonic() + 10
    while True:
        missing = _missing_series(api, compose_like_stack["worker"], model)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, "\n".join(missing)


def _missing_series(api: str, worker: str, model: str) -> list[str]:
    """What the dashboard plots that /metrics does not (yet) export, one line each."""
    by_job = {"jetserve-api": _series(api), "jetserve-worker": _series(worker)}
    both = {**by_job["jetserve-api"], **by_job["jetserve-worker"]}
    external = {"up", "jetstream_consumer_num_pending"}
    missing = []
    for title, expr in dashboard_exprs():
        for name in metric_names_in(concrete_promql(expr)) - external:
            for job, series in by_job.items():
                if f'job="{job}"' in expr and name not in series:
                    missing.append(f"{title!r}: {job} exports no {name}")
            # After one request every plotted series carries the served model's name.
            if not any(labels.get("model_name") == model for labels in both.get(name, [])):
                missing.append(f"{title!r}: no {name} sample with model_name={model!r}")
    return missing
