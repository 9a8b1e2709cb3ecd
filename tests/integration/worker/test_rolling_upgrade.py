"""A rolling upgrade across two adjacent Job wire versions on a real nats-server.

Two real Workers run in-process side by side on one model: one of this release (reads
Job v1) and one of a "next release" that also reads a v2 layout defined here (the
prompt moved under `input`). A newer API publishes a v2 job: the old worker neither runs
nor drops it (nak with a delay, one log line, a counter), and the new worker completes
it. Nothing is mocked: the new worker differs only in the readers it is built with.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import nats
import structlog

from engine_worker.worker.lifecycle import Worker
from shared.bus.job_events import read_history
from shared.bus.subjects import JOBS_STREAM, consumer_name, jobs_subject
from shared.messages import (
    JOB_READERS,
    Job,
    MessageError,
    SamplingParams,
    encode_job,
    job_from_v1,
)
from shared.settings import WorkerSettings

PROMPT = [1, 20, 31, 42, 53, 64]


def job_to_v2(job: Job) -> bytes:
    """What the next release's API would publish: v2 nests the prompt under `input`."""
    m = msgpack.unpackb(encode_job(job))
    m["v"] = 2
    m["input"] = {"token_ids": m.pop("prompt_token_ids")}
    return msgpack.packb(m)


def job_from_v2(m: dict[str, Any]) -> Job:
    """The next release's reader of its own layout."""
    prompt = m.get("input")
    if not isinstance(prompt, dict) or "token_ids" not in prompt:
        raise MessageError("job: v2 needs input.token_ids")
    job = job_from_v1({**m, "prompt_token_ids": prompt["token_ids"]})
    job.v = 2
    return job


def settings(nats_url: str, model: Path, worker_id: str) -> WorkerSettings:
    return WorkerSettings(
        nats_url=nats_url,
        model=str(model),
        worker_id=worker_id,
        metrics_host="127.0.0.1",
        metrics_port=0,
        num_kv_blocks=64,
        max_num_seqs=4,
        ack_wait_s=2.5,  # also the delay before a handed-back job is redelivered
        # Every hand-back is a delivery: enough of them that the old worker's bounces
        # while the new one loads its engine (slow on a busy machine) cannot exhaust
        # them (docs/upgrading.md says what happens then).
        max_deliver=100,
    )


def deferred(worker: Worker, version: str) -> float:
    labels = {"model_name": worker.model_name, "wire_version": version}
    return worker.registry.get_sample_value("jetserve:jobs_deferred_total", labels) or 0.0


async def until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_a_job_of_the_next_version_waits_for_a_worker_that_reads_it(
    nats_server, tiny_llama: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    model = tiny_llama.name
    workers: list[Worker] = []

    def make_job() -> Job:
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        return Job(job_id, model, PROMPT, params, time.time(), "")

    async def finished(job_id: str) -> bool:
        return (await read_history(js, job_id)).terminal

    try:
        with structlog.testing.capture_logs() as logs:
            old = Worker(settings(nats_server.url, tiny_llama, "old"))
            workers.append(old)
            await old.start()
            current, newer = make_job(), make_job()
            await js.publish(
                jobs_subject(model), encode_job(current), headers={"Nats-Msg-Id": current.id}
            )
            await js.publish(
                jobs_subject(model), job_to_v2(newer), headers={"Nats-Msg-Id": newer.id}
            )

            async def bounced_twice() -> bool:
                return deferred(old, "2") >= 2

            await until(lambda: finished(current.id))  # v1 still served
            await until(bounced_twice)
            # Not consumed: no Delta, still in the work queue, held for redelivery.
            assert (await read_history(js, newer.id)).num_deltas == 0
            info = await js.consumer_info(JOBS_STREAM, consumer_name(model))
            assert info.num_ack_pending == 1
            left = [e for e in logs if e["event"] == "job_left_for_newer_worker"]
            assert len(left) == 1 and left[0]["wire_version"] == 2  # once per job
            assert left[0]["msg_id"] == newer.id and left[0]["reads_versions"] == [1]

            new = Worker(
                settings(nats_server.url, tiny_llama, "new"),
                job_readers={**JOB_READERS, 2: job_from_v2},
            )
            workers.append(new)
            await new.start()
            await until(lambda: finished(newer.id))

        done_new, done_current = (
            await read_history(js, newer.id),
            await read_history(js, current.id),
        )
        assert done_new.worker_ids == ["new"] and done_current.worker_ids == ["old"]
        # The same greedy request gives the same tokens whichever version carried it.
        assert done_new.resume_token_ids(1) == done_current.resume_token_ids(1)
        assert len(done_new.resume_token_ids(1)[0]) == 6
        assert deferred(new, "2") == 0
        info = await js.consumer_info(JOBS_STREAM, consumer_name(model))
        assert (info.num_ack_pending, info.num_pending) == (0, 0)
    finally:
        for worker in workers:
            await worker.shutdown()
        await nc.close()
