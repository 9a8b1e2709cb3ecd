"""Bad input, client disconnects and metrics, against the real stack processes.

Every bad request must come back as a 4xx in OpenAI's error format and leave the service
serving; a client that goes away must get its job aborted on the worker (KV blocks
freed); /metrics must show values that move.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support.polling import wait_until
from tests.support.stack import Stack

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def api(stack: Stack) -> httpx.Client:
    with httpx.Client(base_url=stack.api.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def model(stack: Stack) -> str:
    return stack.model_dir.name


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if status < 500:
        assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    return err


def post(api: httpx.Client, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.post(path, content=content, headers={"content-type": "application/json"})


def good_completion(api: httpx.Client, model: str) -> None:
    resp = post(api, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3


def test_health_and_ready(api: httpx.Client, model: str) -> None:
    assert api.get("/health").json() == {"status": "ok"}
    ready = api.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["models"] == [model]


def test_malformed_json(api, model) -> None:
    err = assert_openai_error(post(api, "/v1/completions", b'{"model": "x", "prompt": '), 400)
    assert "JSON" in err["message"]
    assert_openai_error(post(api, "/v1/chat/completions", b"not json at all"), 400)
    assert_openai_error(post(api, "/v1/chat/completions", b""), 400)
    assert_openai_error(post(api, "/v1/completions", [1, 2, 3]), 400)
    good_completion(api, model)


def test_unknown_model_is_404(api, model, stack) -> None:
    resp = post(api, "/v1/completions", {"model": "no-such-model", "prompt": "hi"})
    err = assert_openai_error(resp, 404, param="model")
    assert err["code"] == "model_not_found"
    client = openai.OpenAI(base_url=f"{stack.api.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert_openai_error(api.get("/v1/models/no-such-model"), 404)
    good_completion(api, model)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "ten"),
        ("max_tokens", 2.5),
        ("temperature", "hot"),
        ("n", True),
        ("stream", "yes"),
        ("stop", 5),
        ("seed", "abc"),
        ("prompt", {"text": "hi"}),
        ("prompt", [1, "two"]),
    ],
)
def test_wrong_types_are_400(api, model, field, value) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 3, field: value}
    err = assert_openai_error(post(api, "/v1/completions", body), 400)
    assert err["param"] is not None and err["param"].startswith(field)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
    ],
)
def test_out_of_range_values_are_400(api, model, body, param) -> None:
    full = {"model": model, "prompt": PROMPT, "max_tokens": 3, **body}
    assert_openai_error(post(api, "/v1/completions", full), 400, param=param)


def test_max_tokens_above_the_model_limit(api, model) -> None:
    resp = post(api, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 600})
    err = assert_openai_error(resp, 400, param="max_tokens")
    assert err["code"] == "context_length_exceeded"
    assert "512" in err["message"]
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 10_000,
    }
    assert_openai_error(post(api, "/v1/chat/completions", chat), 400, "max_completion_tokens")
    long_prompt = {"model": model, "prompt": [5] * 600, "max_tokens": 1}
    assert_openai_error(post(api, "/v1/completions", long_prompt), 400, param="prompt")
    good_completion(api, model)


def test_bad_chat_messages(api, model) -> None:
    base = {"model": model, "max_tokens": 3}
    assert_openai_error(post(api, "/v1/chat/completions", {**base, "messages": []}), 400)
    assert_openai_error(post(api, "/v1/chat/completions", base), 400, param="messages")
    bad_role = {**base, "messages": [{"role": "wizard", "content": "hi"}]}
    assert_openai_error(post(api, "/v1/chat/completions", bad_role), 400)
    bad_content = {**base, "messages": [{"role": "user", "content": 42}]}
    assert_openai_error(post(api, "/v1/chat/completions", bad_content), 400)
    no_logprobs = {**base, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    assert_openai_error(post(api, "/v1/chat/completions", no_logprobs), 400, "top_logprobs")
    parts = {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    resp = post(api, "/v1/chat/completions", parts)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_route_and_method(api) -> None:
    assert_openai_error(api.get("/v1/nothing-here"), 404)
    assert api.get("/v1/completions").status_code == 405
    assert "error" in api.get("/v1/completions").json()


def test_unknown_fields_are_ignored(api, model) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "some_future_field": {"a": 1}}
    assert post(api, "/v1/completions", body).status_code == 200


def _worker_blocks(stack: Stack) -> tuple[float, float]:
    return (
        stack.worker.metric("jetserve:num_free_kv_blocks"),
        stack.worker.metric("jetserve:num_total_kv_blocks"),
    )


def _aborted_on_worker(stack: Stack, job_id: str) -> dict | None:
    for e in stack.worker.log_events():
        if e.get("event") == "job_finished" and e.get("job_id") == job_id:
            return e
    return None


def test_client_disconnect_mid_stream_aborts_the_job(stack, model) -> None:
    aborts_before = stack.worker.metric("jetserve:request_success_total", finished_reason="abort")
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 480,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    job_id = None
    with httpx.Client(base_url=stack.api.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("id: "):
                    job_id = line[4:].rsplit(":", 1)[0]
                    break
        # leaving the block closes the connection mid-stream
    assert job_id
    finished = wait_until(lambda: _aborted_on_worker(stack, job_id))
    assert finished["finish_reasons"] == ["abort"]
    assert finished["completion_tokens"] < 480
    assert (
        stack.worker.metric("jetserve:request_success_total", finished_reason="abort")
        == aborts_before + 1
    )
    # every KV block is free again
    wait_until(lambda: _worker_blocks(stack)[0] == _worker_blocks(stack)[1] > 0)


def test_client_disconnect_non_streaming_aborts_the_job(stack, model) -> None:
    def aborts() -> float:
        return stack.worker.metric("jetserve:request_success_total", finished_reason="abort")

    before = aborts()
    body = {"model": model, "prompt": "Workers pull jobs", "max_tokens": 480, "n": 3,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    with httpx.Client(base_url=stack.api.url, timeout=httpx.Timeout(30, read=0.15)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body)
    # the client gave up long before 3 x 480 tokens were generated
    wait_until(lambda: aborts() == before + 1)
    wait_until(lambda: _worker_blocks(stack)[0] == _worker_blocks(stack)[1] > 0)


def test_metrics_move(stack, api, model) -> None:
    def snapshot() -> dict[str, float]:
        return {
            "ttft": stack.api.metric("jetserve:time_to_first_token_seconds_count",
                                     model_name=model),
            "tpot": stack.api.metric("jetserve:time_per_output_token_seconds_count",
                                     model_name=model),
            "e2e": stack.api.metric("jetserve:e2e_request_latency_seconds_count",
                                    model_name=model),
            "prompt": stack.api.metric("jetserve:prompt_tokens_total", model_name=model),
            "gen": stack.api.metric("jetserve:generation_tokens_total", model_name=model),
            "ok": stack.api.metric("jetserve:request_success_total", model_name=model),
            "http": stack.api.metric("jetserve:api_requests_total",
                                     endpoint="/v1/completions", status="200"),
            "http400": stack.api.metric("jetserve:api_requests_total",
                                        endpoint="/v1/completions", status="400"),
        }  # fmt: skip

    before = snapshot()
    good_completion(api, model)
    post(api, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": "x"})
    after = snapshot()
    assert after["ttft"] == before["ttft"] + 1
    assert after["tpot"] == before["tpot"] + 1
    assert after["e2e"] == before["e2e"] + 1
    assert after["prompt"] > before["prompt"]
    assert after["gen"] == before["gen"] + 3
    assert after["ok"] == before["ok"] + 1
    assert after["http"] == before["http"] + 1
    assert after["http400"] == before["http400"] + 1
    # polled from NATS: live workers and the consumer's backlog
    wait_until(lambda: stack.api.metric("jetserve:workers", model_name=model) == 1)
    names = {name for name, _, _ in stack.api.metrics()}
    assert "jetserve:queue_depth" in names
    assert stack.api.metric("jetserve:queue_depth", model_name=model) == 0
    # the worker's side moves too
    assert stack.worker.metric("jetserve:generation_tokens_total") > 0
