"""The gateway's building blocks on their own: the shared token bucket under concurrent
replicas (a real nats-server, one connection per "replica"), the key store's watch,
key records and seeds, and the edge deadline (a real ASGI app under asyncio)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import nats
import pytest
from nats_process import NatsServer

from services.api.gateway.auth import AuthError, authenticate
from services.api.gateway.edge_limits import call_with_deadline
from services.api.gateway.fallback import upstream_url, usage_from_body
from services.api.gateway.key_store import KeyStore, keys_bucket, put_record, revoke, seed_records
from services.api.gateway.keys import (
    ApiKeyRecord,
    KeyLimits,
    KeyRecordError,
    hash_secret,
    new_record,
    parse_keys_env,
    parse_keys_file,
)
from services.api.gateway.rate_limit import Bucket, SharedBuckets, rate_bucket


async def test_token_bucket_is_exact_under_concurrent_replicas(nats_server: NatsServer) -> None:
    """Three connections race 90 takes at a 30/min bucket: exactly 30 are granted."""
    conns = [await nats.connect(nats_server.url) for _ in range(3)]
    try:
        buckets = [SharedBuckets(await rate_bucket(nc.jetstream())) for nc in conns]
        bucket = Bucket(per_minute=30)
        t0 = time.time()
        waits = await asyncio.gather(
            *(buckets[i % 3].take("key_x.req", 1, bucket) for i in range(90))
        )
        elapsed = time.time() - t0
        granted = sum(1 for w in waits if w == 0)
        assert 30 <= granted <= 30 + int(elapsed * 0.5), (granted, elapsed)
        assert all(0 < w <= 2.0 + elapsed for w in waits if w > 0)
        assert sum(b.conflicts for b in buckets) > 0  # the race really happened
        # Giving back tokens makes them available again, never above capacity.
        await buckets[0].give_back("key_x.req", 1000, bucket)
        waits = [await buckets[1].take("key_x.req", 1, bucket) for _ in range(31)]
        assert waits[:30] == [0.0] * 30 and waits[30] > 0
    finally:
        for nc in conns:
            await nc.close()


async def test_key_store_follows_the_bucket(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        kv = await keys_bucket(nc.jetstream())
        secret, record = new_record("svc", KeyLimits(requests_per_minute=5), "batch")
        await put_record(kv, record)
        store = KeyStore(kv)
        await store.start()
        try:
            found = authenticate(store, f"Bearer {secret}")
            assert found.id == record.id and found.priority_floor == 100
            assert store.by_hash[hash_secret(secret)].limits.requests_per_minute == 5
            await revoke(kv, record.id)
            deadline = time.monotonic() + 5
            while not store.by_hash[record.secret_sha256].revoked:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            with pytest.raises(AuthError) as err:
                authenticate(store, f"Bearer {secret}")
            assert err.value.reason == "revoked" and err.value.status == 401
            with pytest.raises(AuthError):
                authenticate(store, "Bearer sk-js-unknown-key-0000000000")
            # Re-seeding the revoked key's secret does not bring it back.
            seeds = parse_keys_env(f"svc={secret}")
            seeds = [ApiKeyRecord(**{**vars(seeds[0]), "id": record.id})]
            await seed_records(kv, seeds)
            await asyncio.sleep(0.2)
            assert store.by_hash[record.secret_sha256].revoked
        finally:
            await store.stop()
    finally:
        await nc.close()


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
