"""A real `docker-compose up` of the secured stack: nats, model-init, model-push, api and
worker, built from this tree (`build`, then `up -d api worker`), with the NATS identities and TLS certificates made the way
docs/deploy.md says (`jetserve nats-auth --out DIR --tls-dir /etc/nats/tls --tls-hosts
nats`), given to the containers as compose secrets.

It checks that a key created as docs/deploy.md says opens a chat completion through the
published API port, and that NATS, seen from inside the compose network, refuses a
client without credentials, a plaintext client with valid ones, and the worker's
identity reading API keys. Then `docker-compose down -v`.

Runs where a Docker engine answers and base images are present; otherwise it is skipped
and says which is missing. Where no image registry is reachable, build local base images
first (deploy/docker/local_base_images.sh, docs/deploy.md). Only the demo model's
training steps are cut (model-init `--steps 10`), so the run takes minutes, not ten.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.deploy_files import COMPOSE, REPO, docker_compose_binary
from tests.support.faults import report
from tests.support.nats_process import free_port

PUBLIC_IMAGES = {"PYTHON_IMAGE": "python:3.11-slim-bookworm", "NATS_IMAGE": "nats:2.12.3-alpine"}
LOCAL_IMAGES = {"PYTHON_IMAGE": "jetserve-base:bookworm", "NATS_IMAGE": "jetserve-nats:local"}
BUILD_TIMEOUT_S = 2400.0  # a first build installs torch and every dependency
READY_TIMEOUT_S = 600.0  # from `up` to a ready API: the demo model, its push, the worker
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + READY_TIMEOUT_S + 300)


def _image_exists(name: str) -> bool:
    done = subprocess.run(
        ["docker", "image", "inspect", name], capture_output=True, timeout=60, check=False
    )
    return done.returncode == 0


def _base_images() -> tuple[dict[str, str] | None, str]:
    """(PYTHON_IMAGE/NATS_IMAGE to build with, None and why not when this cannot run)."""
    if docker_compose_binary() is None:
        return None, "docker-compose is not installed (apt-get install -y docker-compose)"
    if shutil.which("docker") is None:
        return None, "no docker CLI (install Debian's Docker engine package)"
    info = subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False)
    if info.returncode != 0:
        return None, "no Docker engine answers (start dockerd; docs/deploy.md)"
    chosen = {k: os.environ[k] for k in PUBLIC_IMAGES if os.environ.get(k)}
    for candidate in (PUBLIC_IMAGES, LOCAL_IMAGES):
        images = {**candidate, **chosen}
        if all(_image_exists(i) for i in images.values()):
            return images, ""
    return None, (
        "no base images: neither python:3.11-slim-bookworm and nats:2.12.3-alpine nor the "
        "local jetserve-base:bookworm and jetserve-nats:local are present (build them with "
        "deploy/docker/local_base_images.sh, docs/deploy.md)"
    )


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    images, why = _base_images()
    if images is None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("compose-up")
    secrets = root / "secrets"
    made = subprocess.run(
        [sys.executable, "-m", "services.cli", "nats-auth", "--out", str(secrets),
         "--tls-dir", "/etc/nats/tls", "--tls-hosts", "nats"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    override = root / "short-demo.yml"
    override.write_text(
        "services:\n  model-init:\n"
        '    command: ["build-demo", "--out", "/models/jetserve-demo", "--steps", "10"]\n'
    )
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")},
        **images,
        "NATS_SECRETS_DIR": str(secrets),
        "API_HOST_PORT": str(port),
        "TORCH_INDEX_URL": os.environ.get("TORCH_INDEX_URL", ""),
    }
    project = f"jetserve-test-{os.getpid()}"
    compose = [docker_compose_binary(), "-p", project, "-f", str(COMPOSE), "-f", str(override)]

    def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*compose, *args], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{done.stderr[-4000:]}"
        return done

    building = time.monotonic()
    try:
        # The images of this tree (cached layers make a rebuild after a code change quick).
        run("build", "api", "worker", timeout=BUILD_TIMEOUT_S)
        build_s = time.monotonic() - building
        started = time.monotonic()
        run("up", "-d", "api", "worker", timeout=READY_TIMEOUT_S)
        up_s = time.monotonic() - started
        api = f"http://127.0.0.1:{port}"
        deadline = started + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{api}/ready", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                logs = run("logs", "--tail=40", check=False).stdout
                raise TimeoutError(f"the API was not ready after {READY_TIMEOUT_S}s\n{logs}")
            time.sleep(2)
        ready_s = time.monotonic() - started
        report(
            "compose_up",
            f"`build` {build_s:.0f}s; `up -d` returned in {up_s:.0f}s (nats healthy, demo "
            f"model built and pushed); API ready {ready_s:.0f}s after `up` began",
        )
        yield {"run": run, "api": api}
    finally:
        down = time.monotonic()
        run("down", "-v", "--remove-orphans", timeout=300, check=False)
        report("compose_down", f"`down -v` took {time.monotonic() - down:.0f}s")


def test_a_chat_completion_through_the_api_with_a_key(compose_stack: dict) -> None:
    api, run = compose_stack["api"], compose_stack["run"]
    body = {"model": "jetserve-demo", "messages": [{"role": "user", "content": "Hello"}]}
    body["max_tokens"] = 8
    assert httpx.post(f"{api}/v1/chat/completions", json=body, timeout=60).status_code == 401
    created = run("exec", "-T", "api", "jetserve", "keys", "create", "--name", "me", "--json")
    key = json.loads(created.stdout)["key"]
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 15  # the replica picks the key up from its watch
    while (r := httpx.post(f"{api}/v1/chat/completions", json=body, headers=headers, timeout=120))\
            .status_code == 401 and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] >= 1


# Run inside the worker container, on the compose network, as the worker's identity.
PROBE = r"""
import asyncio, json, socket, ssl
import nats

CA = "/run/secrets/nats-ca.crt"
PASSWORD = open("/run/secrets/nats-password").read().strip()
out = {}

async def refused(**options):
    try:
        nc = await nats.connect("nats://nats:4222", allow_reconnect=False, connect_timeout=3, **options)
    except Exception as e:
        return type(e).__name__ + ": " + str(e)[:120]
    await nc.close()
    return None

async def main():
    tls = ssl.create_default_context(cafile=CA)
    out["anonymous"] = await refused(tls=tls)
    out["wrong_password"] = await refused(tls=tls, user="worker", password="x" * 40)
    with socket.create_connection(("nats", 4222), timeout=5) as s:
        info = json.loads(s.recv(4096).decode().split(" ", 1)[1])
        s.sendall(("CONNECT " + json.dumps({"user": "worker", "pass": PASSWORD}) + "\r\nPING\r\n").encode())
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    out["tls_required"] = info.get("tls_required")
    out["plaintext_session"] = b"PONG" in answer
    errors = []
    async def on_error(e):
        errors.append(str(e))
    nc = await nats.connect("nats://nats:4222", tls=tls, user="worker", password=PASSWORD,
                            inbox_prefix="_INBOX.worker", error_cb=on_error, allow_reconnect=False)
    js = nc.jetstream(timeout=2)
    kv = await js.key_value("llm_api_keys")
    try:
        await kv.get("anything")
        out["worker_reads_keys"] = "read"
    except Exception as e:
        out["worker_reads_keys"] = type(e).__name__
    try:
        await kv.put("evil", b"{}")
        out["worker_writes_keys"] = "written"
    except Exception as e:
        out["worker_writes_keys"] = type(e).__name__
    out["worker_sees_jobs"] = (await js.stream_info("LLM_JOBS")).config.name
    await asyncio.sleep(0.3)
    out["violations"] = sum("ermissions" in e for e in errors)
    await nc.close()

asyncio.run(main())
print(json.dumps(out))
"""


def test_nats_refuses_strangers_plaintext_and_the_worker_reading_keys(compose_stack: dict) -> None:
    done = compose_stack["run"]("exec", "-T", "worker", "python", "-c", PROBE, timeout=120)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["anonymous"] and "uthoriz" in seen["anonymous"], seen
    assert seen["wrong_password"] and "uthoriz" in seen["wrong_password"], seen
    assert seen["tls_required"] is True and seen["plaintext_session"] is False, seen
    assert seen["worker_reads_keys"] != "read" and seen["worker_writes_keys"] != "written", seen
    assert seen["violations"] >= 1, seen
    assert seen["worker_sees_jobs"] == "LLM_JOBS"  # its own work still works
