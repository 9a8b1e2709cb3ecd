"""The gateway's state shared through NATS KV, on a real nats-server: the token bucket under
concurrent replicas (one connection per "replica") and the key store's watch."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from services.api.gateway.auth import AuthError, authenticate
from services.api.gateway.key_store import KeyStore, keys_bucket, put_record, revoke, seed_records
from services.api.gateway.keys import (
    ApiKeyRecord,
    KeyLimits,
    hash_secret,
    new_record,
    parse_keys_env,
)
from services.api.gateway.rate_limit import Bucket, SharedBuckets, rate_bucket
from tests.support.nats_process import NatsServer


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
