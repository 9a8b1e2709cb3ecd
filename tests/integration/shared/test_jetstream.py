"""shared/bus/jetstream.py against a real nats-server: stream provisioning and queue depth."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js.api import RetentionPolicy

from shared.bus.jetstream import (
    ensure_jobs_consumer,
    ensure_routed_consumer,
    ensure_streams,
    queue_depth,
    routed_backlog,
)
from shared.bus.subjects import (
    DEAD_STREAM,
    EVENTS_STREAM,
    JOBS_STREAM,
    MODELS_OBJECT_STORE,
    WORKERS_BUCKET,
    jobs_subject,
    routed_consumer_name,
    routed_jobs_subject,
)
from shared.settings import BusSettings
from tests.support.nats_process import NatsServer


async def test_ensure_streams_is_idempotent_and_concurrent(nats_server: NatsServer) -> None:
    settings = BusSettings(events_max_age_s=120.0)
    clients = [await nats.connect(nats_server.url) for _ in range(3)]
    try:
        await asyncio.gather(*(ensure_streams(nc.jetstream(), settings) for nc in clients))
        js = clients[0].jetstream()
        await ensure_streams(js, settings)  # again, after creation
        jobs = await js.stream_info(JOBS_STREAM)
        assert RetentionPolicy(jobs.config.retention) == RetentionPolicy.WORK_QUEUE
        assert jobs.config.duplicate_window == pytest.approx(120.0)
        events = await js.stream_info(EVENTS_STREAM)
        assert events.config.max_age == pytest.approx(120.0)
        await js.stream_info(DEAD_STREAM)
        kv = await js.key_value(WORKERS_BUCKET)
        assert (await kv.status()).ttl == pytest.approx(settings.worker_ttl_s)
        await js.object_store(MODELS_OBJECT_STORE)
        # A changed setting is applied to the existing stream, not rejected.
        await ensure_streams(js, BusSettings(events_max_age_s=60.0))
        assert (await js.stream_info(EVENTS_STREAM)).config.max_age == pytest.approx(60.0)
    finally:
        for nc in clients:
            await nc.close()


async def test_queue_depth_counts_backlog_before_and_after_consumer(
    nats_server: NatsServer,
) -> None:
    settings = BusSettings(ack_wait_s=5.0)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        assert await queue_depth(js, "m") == 0
        for i in range(3):
            await js.publish(jobs_subject("m"), b"x", headers={"Nats-Msg-Id": f"j{i}"})
        await js.publish(jobs_subject("m"), b"x", headers={"Nats-Msg-Id": "j0"})  # duplicate
        await js.publish(jobs_subject("other"), b"x")
        assert await queue_depth(js, "m") == 3
        await ensure_jobs_consumer(js, "m", settings)
        await ensure_jobs_consumer(js, "m", settings)  # idempotent
        assert await queue_depth(js, "m") == 3
        sub = await js.pull_subscribe(jobs_subject("m"), durable="workers-m", stream=JOBS_STREAM)
        msgs = await sub.fetch(2, timeout=2)
        assert len(msgs) == 2
        assert await queue_depth(js, "m") == 1
        await msgs[0].ack()
        await msgs[1].term()
        await asyncio.sleep(0.2)
        # Work-queue retention: acked and terminated jobs leave the stream.
        state = (await js.stream_info(JOBS_STREAM, subjects_filter=jobs_subject("m"))).state
        assert state.subjects == {jobs_subject("m"): 1}
    finally:
        await nc.close()


async def test_queue_depth_counts_jobs_routed_to_workers_until_pulled(
    nats_server: NatsServer,
) -> None:
    """Prefix routing: a job on a worker's routed subject is backlog until that worker (or a
    mover) pulls it, with or without the worker's consumer in place."""
    settings = BusSettings(ack_wait_s=5.0)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        await ensure_jobs_consumer(js, "m", settings)
        await js.publish(jobs_subject("m"), b"x")
        for _ in range(2):
            await js.publish(routed_jobs_subject("m", "w1"), b"x")
        await js.publish(routed_jobs_subject("m", "w2"), b"x")  # w2 has no consumer yet
        assert await routed_backlog(js, "m") == 3
        assert await queue_depth(js, "m") == 4
        await ensure_routed_consumer(js, "m", "w1", settings)
        sub = await js.pull_subscribe_bind(
            durable=routed_consumer_name("m", "w1"), stream=JOBS_STREAM
        )
        (msg,) = await sub.fetch(1, timeout=2)
        assert await queue_depth(js, "m") == 3  # pulled: running, not waiting
        await msg.ack()
        assert await routed_backlog(js, "other") == 0
    finally:
        await nc.close()
