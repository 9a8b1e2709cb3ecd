"""The API and worker run with exactly the environment docker-compose.yml gives them
(real processes, real nats-server, no Docker): both come up healthy and ready, serve a
completion, and export every series the dashboard plots under the labels it filters on.
With a CUDA device the worker also runs with docker-compose.gpu.yml's environment.

NATS is compose's own: deploy/nats/nats.conf with the secrets `jetserve nats-auth
--tls-hosts` makes (identities, client TLS required against a private CA). Only what
cannot hold outside a container is changed: the NATS URL, free ports instead of
8000/8001/4222/8222, temporary directories, where the secret files lie, and a tiny test
checkpoint for the demo model. tests/deploy/test_compose_up.py runs the same under Docker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.support.compose_nats import ComposeNats
from tests.support.deploy_files import (
    COMPOSE,
    COMPOSE_GPU,
    compose_environment,
    concrete_promql,
    dashboard_exprs,
    metric_names_in,
)
from tests.support.nats_process import free_port

START_TIMEOUT_S = 120.0


def _spawn(args: list[str], env: dict[str, Any], log: Path) -> subprocess.Popen:
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
) -> Iterator[dict[str, Any]]:
    files = VARIANTS[request.param]
    if request.param == "gpu" and not torch.cuda.is_available():
        pytest.skip("docker-compose.gpu.yml's worker environment needs a CUDA device")
    root = tmp_path_factory.mktemp(f"compose-env-{request.param}")
    # compose's nats: each service keeps the JETSERVE_NATS_USER compose gives it; its
    # password file and the CA are the ones made here (compose mounts them as secrets).
    nats_server = ComposeNats(root / "nats")
    nats_server.start()
    api_port, worker_port = free_port(), free_port()
    here = {
        "JETSERVE_NATS_URL": nats_server.url,
        "JETSERVE_DATA_DIR": str(root / "data"),
        "JETSERVE_NATS_TLS_CA": str(nats_server.ca),
    }
    worker_env = {
        **compose_environment("worker", files),
        **here,
        "JETSERVE_NATS_PASSWORD_FILE": str(nats_server.password_file("worker")),
        "JETSERVE_WORKER_METRICS_PORT": str(worker_port),
    }
    api_env = {
        **compose_environment("api", files),
        **here,
        "JETSERVE_API_PORT": str(api_port),
        "JETSERVE_NATS_PASSWORD_FILE": str(nats_server.password_file("api")),
    }
    for service in ("api", "worker"):  # compose makes each verify the server's certificate
        ca = compose_environment(service, files)["JETSERVE_NATS_TLS_CA"]
        assert ca == "/run/secrets/nats-ca.crt"
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
            "nats": nats_server,
            "nats_url": nats_server.url,
            "api": f"http://127.0.0.1:{api_port}",
            "worker": f"http://127.0.0.1:{worker_port}",
            "model": worker_env["JETSERVE_MODEL_NAME"],
            # The API container's NATS identity (what `docker compose exec api` runs as).
            "nats_user": api_env["JETSERVE_NATS_USER"],
            "nats_password_file": api_env["JETSERVE_NATS_PASSWORD_FILE"],
            "nats_tls_ca": api_env["JETSERVE_NATS_TLS_CA"],
        }
    finally:
        _stop(api)
        _stop(worker)
        nats_server.stop()


def test_a_key_created_as_deploy_md_says_opens_the_api(
    compose_like_stack: dict[str, Any],
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
        "JETSERVE_NATS_TLS_CA": compose_like_stack["nats_tls_ca"],
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


def _series(url: str) -> dict[str, list[dict[str, Any]]]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, list[dict[str, Any]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def test_probe_endpoints_answer(compose_like_stack: dict[str, Any]) -> None:
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


def test_dashboard_series_exist_with_model_labels(compose_like_stack: dict[str, Any]) -> None:
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


def _plaintext_connect(url: str, user: str, password: str) -> tuple[dict, bytes]:
    """A client that speaks NATS without TLS: the server's INFO, then what it answers to
    CONNECT with valid credentials."""
    import json
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=5) as sock:
        info = json.loads(sock.recv(4096).decode().split(" ", 1)[1])
        connect = {"user": user, "pass": password, "verbose": False, "pedantic": False}
        sock.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return info, answer


async def test_nats_requires_tls_and_an_identity(compose_like_stack: dict[str, Any]) -> None:
    """Client TLS in compose (docs/security.md): a plaintext client is refused even with
    the right password, a TLS client without credentials is refused, one that does not
    trust the CA made at setup cannot connect, and the API's identity over TLS works."""
    import ssl

    import nats

    server: ComposeNats = compose_like_stack["nats"]
    api_password = server.password_file("api").read_text().strip()
    info, answer = _plaintext_connect(server.url, "api", api_password)
    assert info["tls_required"] is True
    assert b"PONG" not in answer  # no session without TLS
    trusted = ssl.create_default_context(cafile=str(server.ca))
    refusals = {
        "anonymous over TLS": {"tls": trusted},
        "a client that does not trust the CA": {
            "tls": ssl.create_default_context(),
            "user": "api",
            "password": api_password,
        },
    }
    for what, options in refusals.items():
        with pytest.raises(Exception):  # noqa: B017 - auth or certificate errors alike
            nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=3, **options)
            await nc.close()
            pytest.fail(f"{what} was let in")
    nc = await nats.connect(
        server.url, tls=trusted, user="api", password=api_password,
        inbox_prefix="_INBOX.api", allow_reconnect=False, connect_timeout=3,
    )  # fmt: skip
    try:
        assert nc.connected_url is not None and nc.connected_url.hostname == "localhost"
        await nc.jetstream().stream_info("LLM_JOBS")
    finally:
        await nc.close()


def test_monitoring_serves_the_scrapers_and_no_content(compose_like_stack: dict[str, Any]) -> None:
    """What scrapes NATS (prometheus-nats-exporter `-varz -connz -jsz=all`, KEDA's scaler)
    reads the HTTP monitoring port, which takes no NATS identity (so there is no exporter
    identity, docs/security.md): it gets the consumer lag it needs, and no prompt, output
    or secret is there to read."""
    server: ComposeNats = compose_like_stack["nats"]
    api, model = compose_like_stack["api"], compose_like_stack["model"]
    marker = "Zanzibar quokka telemetry"
    r = httpx.post(
        f"{api}/v1/completions",
        json={"model": model, "prompt": marker, "max_tokens": 8, "temperature": 0},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    output = r.json()["choices"][0]["text"]
    pages = {
        path: httpx.get(f"{server.monitor_url}{path}", timeout=5)
        for path in (
            "/varz",
            "/connz?subs=1&auth=1",
            "/jsz?streams=1&consumers=1&config=1",
            "/healthz?js-enabled-only=true",
        )
    }
    assert all(page.status_code == 200 for page in pages.values())
    jsz = pages["/jsz?streams=1&consumers=1&config=1"].json()
    details = jsz["account_details"][0]["stream_detail"]
    jobs = next(st for st in details if st["name"] == "LLM_JOBS")
    consumers = {c["name"]: c for c in jobs["consumer_detail"]}
    assert "num_pending" in consumers[f"workers-{model}"]  # the lag KEDA and the dashboard use
    secrets = [marker, API_KEY, *(p.read_text().strip() for p in server.secrets.glob("*.password"))]
    if output.strip():
        secrets.append(output)
    for path, page in pages.items():
        for secret in secrets:
            assert secret not in page.text, f"{path} shows {secret[:12]!r}"
