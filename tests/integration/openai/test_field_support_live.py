"""Against a running API (nats-server, worker, API on tiny_llama): every field
docs/openai.md calls rejected gets a 400 naming it, and the ignored ones are accepted."""

from __future__ import annotations

import httpx
import pytest

from services.api.openai.field_support import ENDPOINTS
from tests.support.stack import Stack

REJECTED = [
    (e, name, f.example)
    for e in ENDPOINTS
    for name, f in e.fields.items()
    if f.status == "rejected"
]


def _base(path: str, model: str) -> dict:
    if path == "/v1/chat/completions":
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if path == "/v1/completions":
        return {"model": model, "prompt": "hi", "max_tokens": 2}
    return {"model": model, "input": "hi"}


def _post(stack: Stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{stack.api.url}{path}", json=body, timeout=60)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.path)
def test_a_plain_request_succeeds(stack: Stack, endpoint) -> None:
    r = _post(stack, endpoint.path, _base(endpoint.path, stack.model_dir.name))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("endpoint", "name", "value"), REJECTED, ids=[f"{e.path}:{n}" for e, n, _ in REJECTED]
)
def test_a_rejected_field_gets_a_400_naming_it(stack: Stack, endpoint, name, value) -> None:
    body = {**_base(endpoint.path, stack.model_dir.name), name: value}
    r = _post(stack, endpoint.path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == name, r.text


def test_the_ignored_chat_fields_are_accepted_together(stack: Stack) -> None:
    chat = next(e for e in ENDPOINTS if e.path == "/v1/chat/completions")
    ignored = {
        "reasoning_effort": "low",
        "verbosity": "low",
        "prediction": {"type": "content", "content": "x"},
        "store": True,
        "metadata": {"team": "a"},
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
    }
    assert set(ignored) == {n for n, f in chat.fields.items() if f.status == "ignored"}
    body = {**_base(chat.path, stack.model_dir.name), **ignored, "modalities": ["text"]}
    r = _post(stack, chat.path, body)
    assert r.status_code == 200, r.text
