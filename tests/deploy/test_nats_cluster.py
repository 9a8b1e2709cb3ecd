"""A 3-node JetStream cluster from deploy/nats/cluster.conf keeps the job queue through
the crash of a node: jobs on the R3 work-queue stream keep flowing to a durable pull
consumer, and every job is consumed (at least once; deduplicated by job id, none lost).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

from shared.bus.jetstream import jobs_consumer_config, stream_configs
from shared.bus.nats_connect import connect
from shared.bus.subjects import JOBS_STREAM, consumer_name, jobs_subject
from shared.messages import Job, SamplingParams, decode_job, encode_job
from shared.settings import BusSettings
from tests.support.nats_cluster import LoopbackCluster, loopback_cluster

MODEL = "cluster-test"
NUM_JOBS = 300
# What a client sees while a leader is re-elected or its server connection moves.
TRANSIENT = (
    NatsTimeoutError,
    NoRespondersError,
    NoStreamResponseError,
    APIError,
    asyncio.TimeoutError,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LoopbackCluster]:
    c = loopback_cluster(tmp_path)
    c.start()
    yield c
    c.stop()


def _job(i: int) -> Job:
    return Job(
        id=f"job-{i:04d}",
        model=MODEL,
        prompt_token_ids=[1, 2, 3, i % 50],
        sampling=SamplingParams(max_tokens=4),
        created_at=time.time(),
        reply_to=f"llm.events.job-{i:04d}",
    )


async def _retry(coro_factory, deadline_s: float = 30.0):
    """Retry a JetStream call through a leader election (timeouts, 503s)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await coro_factory()
        except TRANSIENT:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _publish(js, jobs: list[Job]) -> None:
    for job in jobs:
        # Same Nats-Msg-Id on every retry: a publish that landed before its ack was lost
        # is dropped as a duplicate by the stream, not queued twice.
        await _retry(
            lambda job=job: js.publish(
                jobs_subject(MODEL), encode_job(job), headers={"Nats-Msg-Id": job.id}
            )
        )


async def test_jobs_keep_flowing_when_a_node_dies(cluster: LoopbackCluster) -> None:
    settings = BusSettings(ack_wait_s=3.0, max_deliver=20)
    consumer: asyncio.Task | None = None
    nc = await nats.connect(
        **cluster.connect_kwargs("operator"),
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        connect_timeout=2,
    )
    try:
        js = nc.jetstream(timeout=3.0)
        # The production stream and consumer definitions, replicated on all three nodes.
        jobs_stream = replace(stream_configs(settings)[0], num_replicas=3)
        await _retry(lambda: js.add_stream(jobs_stream))
        await _retry(lambda: js.add_consumer(JOBS_STREAM, jobs_consumer_config(MODEL, settings)))
        info = await js.stream_info(JOBS_STREAM)
        assert info.config.num_replicas == 3
        assert len(info.cluster.replicas) == 2  # leader + 2 followers

        jobs = [_job(i) for i in range(NUM_JOBS)]
        await _publish(js, jobs[: NUM_JOBS // 2])

        sub = await js.pull_subscribe_bind(consumer_name(MODEL), JOBS_STREAM)
        seen: Counter[str] = Counter()
        killed: list[str] = []
        all_ids = {j.id for j in jobs}
        third_done = asyncio.Event()

        async def consume() -> None:
            while set(seen) != all_ids:
                try:
                    msgs = await sub.fetch(16, timeout=1.0)
                except TRANSIENT:
                    continue
                for msg in msgs:
                    job = decode_job(msg.data)
                    assert msg.headers["Nats-Msg-Id"] == job.id
                    seen[job.id] += 1
                    if len(seen) >= NUM_JOBS // 3:
                        third_done.set()
                    try:
                        await msg.ack_sync(timeout=2.0)
                    except TRANSIENT:
                        pass  # unconfirmed ack: the job comes back after ack_wait
                await asyncio.sleep(0)

        consumer = asyncio.create_task(consume())
        # Kill the stream's leader (the node taking every publish) once a third is done.
        await asyncio.wait_for(third_done.wait(), timeout=60)
        leader = (await _retry(lambda: js.stream_info(JOBS_STREAM))).cluster.leader
        consumed_before_kill = len(seen)
        cluster.node(leader).kill()
        killed.append(leader)

        await _publish(js, jobs[NUM_JOBS // 2 :])
        await asyncio.wait_for(consumer, timeout=90)

        assert set(seen) == all_ids, f"lost jobs: {sorted(all_ids - set(seen))[:10]}"
        duplicates = {k: v for k, v in seen.items() if v > 1}
        print(
            f"killed stream leader {leader} after {consumed_before_kill}/{NUM_JOBS} jobs; "
            f"all {NUM_JOBS} consumed, {len(duplicates)} redelivered"
        )
        # Redeliveries are bounded: only jobs in flight around the crash come back.
        assert sum(duplicates.values()) - len(duplicates) < NUM_JOBS // 2

        after = await _retry(lambda: js.stream_info(JOBS_STREAM))
        assert after.cluster.leader not in killed
        offline = [r.name for r in after.cluster.replicas if r.offline]
        assert offline in ([], killed)  # the dead node may not be flagged yet

        # Work-queue retention: acked jobs leave the stream; the backlog drains to zero.
        deadline = time.monotonic() + 30
        while (await _retry(lambda: js.stream_info(JOBS_STREAM))).state.messages:
            assert time.monotonic() < deadline, "acked jobs still in the stream"
            await asyncio.sleep(0.2)

        # The crashed node rejoins from its store and catches up: R3 again.
        cluster.node(leader).start(cluster.routes)
        cluster.wait_healthy(cluster.nodes)
        deadline = time.monotonic() + 30
        while True:
            info = await _retry(lambda: js.stream_info(JOBS_STREAM))
            peers = info.cluster.replicas or []
            if len(peers) == 2 and all(p.current and not p.offline for p in peers):
                break
            assert time.monotonic() < deadline, f"replicas not current: {peers}"
            await asyncio.sleep(0.2)
    finally:
        if consumer is not None and not consumer.done():
            consumer.cancel()
        await nc.close()


async def test_cluster_requires_identities_and_tls(cluster: LoopbackCluster) -> None:
    """No anonymous client, no plaintext client; an identity over TLS gets in, and the
    routes between the nodes (mutual TLS) carry an R3 stream."""
    for kwargs in (
        {"servers": cluster.client_urls},  # anonymous, plaintext
        {"servers": cluster.client_urls, "tls": cluster.tls_context()},  # anonymous, TLS
        {**cluster.connect_kwargs("api"), "tls": None},  # an identity, but plaintext
    ):
        with pytest.raises(Exception):  # noqa: B017 (refused: auth or TLS, by server)
            nc = await nats.connect(**kwargs, allow_reconnect=False, connect_timeout=2)
            await nc.close()
    nc = await nats.connect(**cluster.connect_kwargs("api"), connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5.0)
        config = replace(stream_configs(BusSettings())[1], num_replicas=3)
        await _retry(lambda: js.add_stream(config))
        ack = await _retry(lambda: js.publish("llm.events.tls-probe", b"x"))
        assert ack.seq >= 1
        info = await js.stream_info(config.name)
        assert len(info.cluster.replicas or []) == 2  # the other two nodes, over the routes
    finally:
        await nc.close()
    # What the API and workers do: shared/bus/nats_connect.py from their settings.
    settings = BusSettings(
        nats_url=cluster.client_urls[0],
        nats_user="worker",
        nats_password_file=str(cluster.secrets / "worker.password"),
        nats_tls_ca=str(cluster.secrets / "ca.crt"),
    )
    nc = await connect(settings, connect_timeout=5)
    try:
        assert nc.is_connected and nc.connected_url.scheme == "nats"
        assert (await nc.jetstream(timeout=5.0).stream_info(config.name)).config.name
    finally:
        await nc.close()
