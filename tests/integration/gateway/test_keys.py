"""API keys, per-key limits, usage metering, priority classes and edge limits, against real
processes: one nats-server, one worker, two API replicas with auth on.

What must hold: no endpoint but /health, /ready and /metrics answers without a valid
key; a key created or revoked with `jetserve keys` takes effect on every replica within
seconds, without restarts; requests/min and tokens/min hold across the two replicas
(the buckets live in NATS KV); caps give 400s, limits 429s with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path

import httpx
import nats
import openai
import pytest

from services.api.app import create_app
from services.api.errors import ollama_path
from services.api.openapi_doc import OPENAPI_PATH, build_openapi
from shared.messages import decode_job
from shared.settings import ApiSettings, GatewaySettings
from tests.support.gateway import (
    assert_openai_error,
    auth,
    completion,
    gateway_env,
    keys_cli,
    secret,
    write_keys_file,
)
from tests.support.polling import wait_until
from tests.support.stack import Stack

PUBLIC = ("/health", "/ready", "/metrics", "/", "/api/version")
KEYS = {
    "admin": {"operator": True},  # also reads the per-key series of /metrics
    "rpm": {"limits": {"requests_per_minute": 6}},
    "tpm": {"limits": {"tokens_per_minute": 200}},
    "capped": {"limits": {"max_tokens": 8, "max_prompt_tokens": 20}},
    "single": {"limits": {"max_concurrent": 1}},
    "batch": {"priority_class": "batch"},
}
MAX_BODY = 65536
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path):
    root = tmp_path_factory.mktemp("gateway")
    keys = write_keys_file(root / "keys.json", KEYS)
    stack = Stack.create(root / "stack", tiny_llama)
    env = gateway_env(
        keys,
        JETSERVE_MAX_BODY_BYTES=str(MAX_BODY),
        JETSERVE_BODY_TIMEOUT="1",
        JETSERVE_CORS_ORIGINS=ORIGIN,
    )
    try:
        stack.start_worker()
        stack.start_api(env=env)
        stack.start_api(env=env)
        for api in stack.apis:
            api.metrics_headers = auth("admin")
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def model(gw: Stack) -> str:
    return gw.model_dir.name


def routes() -> list[tuple[str, str]]:
    """(method, path) of every operation the app documents, path parameters filled in."""
    app = create_app(ApiSettings(), GatewaySettings())
    doc = build_openapi(app, PUBLIC)
    out = [("GET", OPENAPI_PATH)]
    for path, operations in doc["paths"].items():
        for method in operations:
            out.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path)))
    return out


def test_public_paths_answer_without_a_key(gw: Stack) -> None:
    for api in gw.apis:
        for path in PUBLIC:
            assert api.get(path).status_code == 200, path


def test_no_other_endpoint_answers_without_a_valid_key(gw: Stack) -> None:
    checked = [(m, p) for m, p in routes() if p not in PUBLIC]
    checked += [("GET", "/no/such/path"), ("POST", "/v1/embeddings")]
    assert {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/openapi.json",
        "/api/generate",
        "/api/chat",
        "/api/tags",
    } <= {p for _, p in checked}
    bad_headers = [
        {},
        {"Authorization": "Bearer sk-not-a-key-0123456789abcdef"},
        {"Authorization": f"Basic {secret('admin')}"},
        {"Authorization": "Bearer"},
    ]
    for api in gw.apis:
        for method, path in checked:
            for headers in bad_headers:
                resp = httpx.request(method, api.url + path, headers=headers, json={}, timeout=10)
                if ollama_path(path):  # Ollama's dialect: {"error": "..."}
                    assert resp.status_code == 401 and isinstance(resp.json()["error"], str)
                else:
                    err = assert_openai_error(resp, 401, "authentication_error")
                    assert err["code"] == "invalid_api_key"
                assert resp.headers["www-authenticate"] == "Bearer"
                assert secret("admin") not in resp.text
    print(f"401 checked on {len(checked)} endpoints x {len(bad_headers)} bad headers x 2 APIs")
    failures = gw.apis[0].metric("jetserve:auth_failures_total")
    assert failures >= len(checked) * len(bad_headers)


def test_openai_sdk_sends_the_key_as_bearer(gw: Stack, model: str) -> None:
    client = openai.OpenAI(base_url=gw.apis[1].url + "/v1", api_key=secret("admin"), max_retries=0)
    out = client.completions.create(model=model, prompt="Hello", max_tokens=3)
    assert out.usage.completion_tokens == 3
    assert [m.id for m in client.models.list()] == [model]
    wrong = openai.OpenAI(
        base_url=gw.apis[1].url + "/v1", api_key="sk-wrong-0123456789", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model, prompt="Hello", max_tokens=3)


def test_keys_created_and_revoked_without_restarts(gw: Stack, model: str) -> None:
    created = keys_cli(gw.nats_url, "create", "--name", "ops-test", "--rpm", "1000")
    headers = {"Authorization": f"Bearer {created['key']}"}
    t0 = time.monotonic()
    for api in gw.apis:
        wait_until(lambda api=api: completion(api, model, headers).status_code == 200, timeout=5)
    created_s = time.monotonic() - t0
    listed = {k["id"]: k for k in keys_cli(gw.nats_url, "list")}
    assert listed[created["id"]]["name"] == "ops-test"
    assert listed[created["id"]]["limits"] == {"requests_per_minute": 1000}
    assert created["key"] not in json.dumps(listed)  # never a secret in a listing
    assert keys_cli(gw.nats_url, "revoke", created["id"]) == {"id": created["id"], "revoked": True}
    t0 = time.monotonic()
    for api in gw.apis:
        wait_until(lambda api=api: completion(api, model, headers).status_code == 401, timeout=5)
    revoked_s = time.monotonic() - t0
    err = assert_openai_error(completion(gw.apis[0], model, headers), 401, "authentication_error")
    assert "revoked" in err["message"]
    assert keys_cli(gw.nats_url, "list")[-1]["revoked"] is True
    print(f"new key usable on both replicas after {created_s:.2f}s, revoked after {revoked_s:.2f}s")


def test_requests_per_minute_hold_across_two_replicas(gw: Stack) -> None:
    t0 = time.monotonic()
    statuses = []
    retry_after = []
    for i in range(14):
        resp = httpx.get(gw.apis[i % 2].url + "/v1/models", headers=auth("rpm"), timeout=10)
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert_openai_error(resp, 429, "rate_limit_error")
            retry_after.append(int(resp.headers["retry-after"]))
    elapsed = time.monotonic() - t0
    ok = statuses.count(200)
    # 6 per minute in one bucket for both replicas; refill adds 0.1 per second.
    assert 6 <= ok <= 6 + int(elapsed / 10), (statuses, elapsed)
    assert set(statuses) == {200, 429}
    assert all(1 <= r <= 10 for r in retry_after), retry_after
    assert statuses[:6] == [200] * 6


def test_tokens_per_minute_hold_across_two_replicas(gw: Stack, model: str) -> None:
    too_big = completion(gw.apis[0], model, auth("tpm"), max_tokens=300)
    err = assert_openai_error(too_big, 429, "rate_limit_error")
    assert "Request too large" in err["message"]
    t0 = time.monotonic()
    statuses = []
    for i in range(7):
        # 5 prompt + 40 completion tokens each (ignore_eos: exactly 40).
        resp = completion(gw.apis[i % 2], model, auth("tpm"), max_tokens=40, ignore_eos=True)
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            assert resp.json()["usage"]["total_tokens"] == 45
        else:
            assert_openai_error(resp, 429, "rate_limit_error")
            assert int(resp.headers["retry-after"]) >= 1
    elapsed = time.monotonic() - t0
    ok = statuses.count(200)
    assert 200 // 45 <= ok <= (200 + elapsed * 200 / 60) // 45, (statuses, elapsed)
    assert statuses[: 200 // 45] == [200] * (200 // 45)
    assert 429 in statuses
    assert gw.apis[0].metric("jetserve:rate_limited_requests_total", key_id="key_tpm") >= 1


def test_max_tokens_and_prompt_caps(gw: Stack, model: str) -> None:
    api = gw.apis[0]
    err = assert_openai_error(
        completion(api, model, auth("capped"), max_tokens=9), 400, "invalid_request_error"
    )
    assert err["param"] == "max_tokens" and err["code"] == "max_tokens_exceeded"
    unset = completion(api, model, auth("capped"), max_tokens=None, ignore_eos=True)
    assert unset.status_code == 200, unset.text
    assert unset.json()["usage"]["completion_tokens"] == 8  # the default is capped, not refused
    long_prompt = completion(api, model, auth("capped"), prompt=list(range(1, 30)))
    err = assert_openai_error(long_prompt, 400, "invalid_request_error")
    assert err["code"] == "prompt_too_long"
    assert completion(api, model, auth("capped"), max_tokens=8).status_code == 200


def test_concurrent_streams_per_key(gw: Stack, model: str) -> None:
    api0, api1 = gw.apis
    body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 480, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(timeout=60) as client:
        with client.stream(
            "POST", api0.url + "/v1/completions", json=body, headers=auth("single")
        ) as s:
            assert s.status_code == 200
            lines = s.iter_lines()  # kept referenced: closing it would close the stream
            assert "text" in next(line for line in lines if line.startswith("data: "))
            second = completion(api0, model, auth("single"))
            err = assert_openai_error(second, 429, "rate_limit_error")
            assert "concurrent" in err["message"]
            # The limit is per replica (a crashed replica must not leak slots).
            assert completion(api1, model, auth("single")).status_code == 200
        # The client went away: the slot is free again.
        wait_until(lambda: completion(api0, model, auth("single")).status_code == 200, timeout=10)


def test_usage_metered_per_key_and_tag(gw: Stack, model: str) -> None:
    api = gw.apis[1]
    labels = {"key_id": "key_admin", "tag": "search"}
    before = {
        name: api.metric(f"jetserve:usage_{name}_total", **labels)
        for name in ("prompt_tokens", "completion_tokens", "requests")
    }
    resp = completion(
        api, model, {**auth("admin"), "X-Feature": "search"}, max_tokens=5, user="alice",
        ignore_eos=True,
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert (
        api.metric("jetserve:usage_requests_total", route="local", **labels)
        == before["requests"] + 1
    )
    assert (
        api.metric("jetserve:usage_prompt_tokens_total", **labels)
        == before["prompt_tokens"] + usage["prompt_tokens"]
    )
    assert (
        api.metric("jetserve:usage_completion_tokens_total", **labels)
        == before["completion_tokens"] + 5
    )
    assert api.metric("jetserve:usage_gpu_seconds_total", **labels) > 0
    # An end user's `user` never becomes a label (issue 17): without X-Feature, no tag.
    untagged = api.metric("jetserve:usage_requests_total", key_id="key_admin", tag="")
    completion(api, model, auth("admin"), user="carol")
    assert api.metric("jetserve:usage_requests_total", key_id="key_admin", tag="carol") == 0
    assert api.metric("jetserve:usage_requests_total", key_id="key_admin", tag="") == untagged + 1
    anonymous = httpx.get(api.url + "/metrics", timeout=10).text
    assert "key_admin" not in anonymous and "carol" not in anonymous
    line = wait_until(
        lambda: [
            e for e in api.log_events() if e.get("event") == "usage" and e.get("user") == "alice"
        ]
    )[-1]
    assert line["key_id"] == "key_admin" and line["key_name"] == "admin"
    assert line["feature"] == "search" and line["route"] == "local"
    assert line["prompt_tokens"] == usage["prompt_tokens"] and line["completion_tokens"] == 5
    assert line["gpu_time_s"] > 0 and line["queue_time_s"] >= 0
    assert line["job_id"] == line["request_id"]


async def test_priority_class_and_cost_tags_reach_the_job(gw: Stack, model: str) -> None:
    nc = await nats.connect(gw.nats_url)
    jobs: asyncio.Queue = asyncio.Queue()

    async def on_job(msg) -> None:
        jobs.put_nowait(decode_job(msg.data))

    sub = await nc.subscribe("llm.jobs.>", cb=on_job)
    try:
        async with httpx.AsyncClient(base_url=gw.apis[0].url, timeout=60) as client:
            body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 2, "user": "bob"}
            resp = await client.post(
                "/v1/completions", json=body, headers={**auth("batch"), "X-Feature": "nightly"}
            )
            assert resp.status_code == 200, resp.text
            job = await asyncio.wait_for(jobs.get(), 10)
            assert job.priority == 100  # the batch class: runs after interactive work
            assert job.tags == {"key_id": "key_batch", "feature": "nightly", "user": "bob"}
            # An interactive key cannot jump ahead of its class with a negative priority.
            resp = await client.post(
                "/v1/completions", json={**body, "priority": -7}, headers=auth("admin")
            )
            assert resp.status_code == 200, resp.text
            job = await asyncio.wait_for(jobs.get(), 10)
            assert job.priority == 0 and job.tags["key_id"] == "key_admin"
    finally:
        await sub.unsubscribe()
        await nc.close()


def test_body_size_and_read_time_limits(gw: Stack, model: str) -> None:
    api = gw.apis[0]
    big = json.dumps({"model": model, "prompt": "x" * (MAX_BODY + 10)}).encode()
    err = assert_openai_error(
        httpx.post(api.url + "/v1/completions", content=big, headers=auth("admin"), timeout=10),
        413,
        "invalid_request_error",
    )
    assert err["code"] == "request_too_large"
    # No Content-Length (chunked): counted while reading.
    chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))
    resp = httpx.post(
        api.url + "/v1/completions", content=chunks, headers=auth("admin"), timeout=10
    )
    assert resp.status_code == 413
    # A body that never completes: 408 after the 1 s body timeout.
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {secret('admin')}\r\n".encode()
            + b"Content-Length: 100\r\n\r\n{"
        )
        t0 = time.monotonic()
        head = sock.recv(65536).decode(errors="replace")
        assert head.startswith("HTTP/1.1 408"), head
        assert 0.8 <= time.monotonic() - t0 <= 5
    assert completion(api, model, auth("admin")).status_code == 200  # still serving


def test_cors(gw: Stack) -> None:
    api = gw.apis[0]
    preflight = httpx.options(
        api.url + "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200  # no key on a preflight, by design of CORS
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    resp = httpx.get(api.url + "/v1/models", headers={**auth("admin"), "Origin": ORIGIN})
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(
        api.url + "/v1/models", headers={**auth("admin"), "Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_ollama_routes_go_through_the_same_gateway(gw: Stack, model: str) -> None:
    """Keys, caps and metering on Ollama's routes, errors in Ollama's shape."""
    import ollama

    api = gw.apis[0]
    labels = {"key_id": "key_admin", "tag": "ollama"}
    before = api.metric("jetserve:usage_completion_tokens_total", **labels)
    client = ollama.Client(host=api.url, headers={**auth("admin"), "X-Feature": "ollama"})
    out = client.generate(model=model, prompt="Hello", raw=True, options={"num_predict": 4})
    assert out.eval_count >= 1
    assert api.metric("jetserve:usage_completion_tokens_total", **labels) == before + out.eval_count
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=api.url).generate(model=model, prompt="Hello")
    assert e.value.status_code == 401 and "API key" in e.value.error
    capped = ollama.Client(host=api.url, headers=auth("capped"))
    with pytest.raises(ollama.ResponseError) as e:
        capped.generate(model=model, prompt="Hello", raw=True, options={"num_predict": 50})
    assert e.value.status_code == 400 and "at most 8" in e.value.error
    assert len(capped.generate(model=model, prompt="Hello", raw=True).context) > 0
