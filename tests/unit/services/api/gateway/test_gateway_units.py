"""The gateway's building blocks on their own: key records and seeds, the edge deadline (a
real ASGI app under asyncio) and the fallback helpers. The token bucket and the key store
on a real nats-server: tests/integration/gateway/test_shared_state.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.api.gateway.edge_limits import call_with_deadline
from services.api.gateway.fallback import upstream_url, usage_from_body
from services.api.gateway.keys import (
    ApiKeyRecord,
    KeyLimits,
    KeyRecordError,
    hash_secret,
    new_record,
    parse_keys_file,
)


def test_key_records_validate(tmp_path: Path) -> None:
    secret, record = new_record("a", KeyLimits(max_tokens=10))
    assert secret.startswith("sk-js-") and len(secret) > 40
    assert secret not in record.to_json().decode()
    assert ApiKeyRecord.from_json(record.to_json()) == record
    for bad in (b"[]", b"{}", b'{"id": "x", "name": "n", "secret_sha256": "zz"}'):
        with pytest.raises(KeyRecordError):
            ApiKeyRecord.from_json(bad)
    with pytest.raises(KeyRecordError):
        KeyLimits.from_dict({"max_tokens": -1})
    with pytest.raises(KeyRecordError):
        KeyLimits.from_dict({"burst": 3})
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": "k" * 20, "name": "x", "priority_class": "batch"},
                    {"sha256": hash_secret("y" * 20), "limits": {"tokens_per_minute": 100}},
                ]
            }
        )
    )
    first, second = parse_keys_file(path)
    assert first.secret_sha256 == hash_secret("k" * 20) and first.priority_class == "batch"
    assert (
        second.limits.tokens_per_minute == 100 and second.id == "key_" + second.secret_sha256[:12]
    )
    path.write_text(json.dumps([{"key": "short"}]))
    with pytest.raises(KeyRecordError):
        parse_keys_file(path)


async def test_deadline_answers_504_and_cancels_the_handler() -> None:
    cancelled = asyncio.Event()
    sent: list[dict] = []

    async def slow_app(scope, receive, send) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def streaming_app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.3)  # longer than the deadline, but the response has started
        await send({"type": "http.response.body", "body": b"done", "more_body": False})

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    await call_with_deadline(slow_app, scope, receive, send, 0.1)
    assert cancelled.is_set()
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"])["error"]["code"] == "timeout"
    sent.clear()
    await call_with_deadline(streaming_app, scope, receive, send, 0.1)
    assert [m.get("status") for m in sent][:1] == [200] and sent[-1]["body"] == b"done"


def test_fallback_helpers() -> None:
    assert upstream_url("http://up:8000/v1", "/v1/chat/completions") == (
        "http://up:8000/v1/chat/completions"
    )
    assert upstream_url("http://up:8000/", "/v1/completions") == "http://up:8000/v1/completions"
    sse = (
        b'data: {"choices": [{"text": "a"}], "usage": null}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage_from_body("text/event-stream", sse) == {"prompt_tokens": 3, "completion_tokens": 2}
    assert usage_from_body("application/json", b'{"usage": {"prompt_tokens": 1}}') == {
        "prompt_tokens": 1
    }
    assert usage_from_body("application/json", b"not json") is None
