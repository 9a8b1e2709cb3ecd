"""The worker process against a real nats-server, driven over the bus like the API does."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import msgpack
import pytest

from engine_worker.engine.llm import LLM
from shared.bus.jetstream import models_object_store
from shared.bus.subjects import model_object_name
from shared.messages import encode_job
from shared.sampling_params import SamplingParams
from shared.settings import BusSettings
from tests.support.polling import wait_for
from tests.support.stack import BusClient, Stack, finish_reasons, tokens_by_index

PROMPT = [1, 20, 31, 42, 53, 64, 75]


async def wait_until(predicate, timeout_s: float = 20.0):
    """Poll `predicate` (sync or async) until truthy; return its value."""
    return await wait_for(predicate, timeout_s, interval=0.05)


def check_well_formed(deltas, worker_ids=None) -> None:
    """seq counts from 0 without gaps; exactly the last Delta is finished and has usage."""
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].usage is not None
    if worker_ids is not None:
        assert {d.worker_id for d in deltas} <= worker_ids


async def test_worker_output_equals_in_process_engine(bus_stack: Stack, bus: BusClient) -> None:
    bus_stack.start_worker()
    greedy = bus.make_job(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = bus.make_job(PROMPT, max_tokens=10, temperature=0.9, top_p=0.9, seed=11, n=2)
    for job in (greedy, seeded):
        await bus.submit(job)
    got = {job.id: await bus.collect(job.id) for job in (greedy, seeded)}

    llm = LLM(str(bus_stack.model_dir))
    want = llm.generate(
        [PROMPT, PROMPT],
        [
            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=11, n=2),
        ],
    )
    for job, result in zip((greedy, seeded), want, strict=True):
        deltas = got[job.id]
        check_well_formed(deltas)
        tokens = tokens_by_index(deltas)
        assert tokens == {c.index: c.token_ids for c in result.outputs}
        reasons = finish_reasons(deltas)
        assert reasons == {c.index: c.finish_reason for c in result.outputs}
        usage = deltas[-1].usage
        assert usage.prompt_tokens == len(PROMPT)
        assert usage.completion_tokens == sum(len(t) for t in tokens.values())
        assert usage.gpu_time_s > 0 and usage.queue_time_s >= 0
    assert len(tokens_by_index(got[greedy.id])[0]) == 12


async def test_logprobs_travel_in_deltas(bus_stack: Stack, bus: BusClient) -> None:
    bus_stack.start_worker()
    job = bus.make_job(PROMPT, max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True)
    await bus.submit(job)
    deltas = await bus.collect(job.id)
    entries = [lp for d in deltas for c in d.chunks for lp in (c.logprobs or [])]
    tokens = tokens_by_index(deltas)[0]
    assert [e[0] for e in entries] == tokens
    for token_id, logprob, top in entries:
        assert logprob <= 0 and len(top) == 3
        assert top[0][0] == token_id  # greedy: the sampled token is the most likely one


async def test_malformed_jobs_are_terminated_and_worker_keeps_running(
    bus_stack: Stack, bus: BusClient
) -> None:
    worker = bus_stack.start_worker()
    good_job = bus.make_job(PROMPT, max_tokens=3)
    bad_version = msgpack.unpackb(encode_job(good_job))
    bad_version["v"] = 0  # no release reads it (a newer one, v2+, is left for a newer worker)
    wrong_type = msgpack.unpackb(encode_job(good_job))
    wrong_type["prompt_token_ids"] = "1 2 3"
    await bus.publish_raw(b"\xc1 not msgpack", msg_id="bad-bytes")
    await bus.publish_raw(msgpack.packb(bad_version), msg_id="bad-version")
    await bus.publish_raw(msgpack.packb(wrong_type), msg_id="bad-type")
    await bus.publish_raw(b"", msg_id=None)  # no id: nobody to answer, still terminated
    invalid = bus.make_job([1, 10**6], max_tokens=3)  # token id outside the vocabulary
    await bus.submit(invalid)
    await bus.submit(good_job)

    deltas = await bus.collect(good_job.id)
    check_well_formed(deltas)
    assert finish_reasons(deltas) == {0: "length"}
    for msg_id in ("bad-bytes", "bad-version", "bad-type"):
        (err,) = await bus.collect(msg_id)
        assert err.finished and err.error and err.error.startswith("malformed job")
        assert err.chunks[0].finish_reason == "error"
    (rejected,) = await bus.collect(invalid.id)
    assert rejected.finished and rejected.error
    assert rejected.chunks[0].finish_reason == "error"

    # Terminated, not redelivered: nothing pending, nothing left in the work queue.
    info = await wait_until(lambda: _settled(bus), timeout_s=10)
    assert info.num_redelivered == 0
    assert await bus.jobs_in_stream() == 0
    assert worker.alive
    rejected_logs = [e for e in worker.log_events() if e.get("event") == "job_rejected"]
    assert sorted(e["reason"] for e in rejected_logs) == ["invalid"] + ["malformed"] * 4
    assert worker.metric("jetserve:jobs_rejected_total", reason="malformed") == 4
    assert worker.metric("jetserve:jobs_rejected_total", reason="invalid") == 1
    # And it still serves.
    again = bus.make_job(PROMPT, max_tokens=2)
    await bus.submit(again)
    check_well_formed(await bus.collect(again.id))


async def _settled(bus: BusClient):
    info = await bus.consumer()
    return info if info.num_pending == 0 and info.num_ack_pending == 0 else None


async def test_backpressure_leaves_backlog_in_jetstream(
    bus_stack: Stack, bus: BusClient, tiny_llama_long: Path
) -> None:
    bus_stack.start_worker("--max-num-seqs", "2", model_dir=tiny_llama_long)
    bus.model = tiny_llama_long.name
    jobs = [bus.make_job(PROMPT, max_tokens=4000, ignore_eos=True) for _ in range(6)]
    for job in jobs:
        await bus.submit(job)
    streams = [bus.deltas(job.id) for job in jobs]
    # Wait until two jobs are producing tokens, then look at the consumer.
    await asyncio.gather(*(anext(s) for s in streams[:2]))
    for _ in range(10):
        info = await bus.consumer()
        assert info.num_ack_pending == 2, info
        assert info.num_pending == 4, info
        await asyncio.sleep(0.05)
    (status,) = await bus.workers()
    assert status.capacity == 2 and status.num_running <= 2
    # Cancel everything: running jobs abort, queued ones are skipped when pulled.
    for job in jobs:
        await bus.cancel(job.id)
    for stream in streams:
        rest = [d async for d in stream]
        assert rest[-1].finished
        assert set(finish_reasons(rest).values()) == {"abort"}
    await wait_until(lambda: _settled(bus), timeout_s=10)
    assert await bus.jobs_in_stream() == 0


async def test_cancel_frees_kv_blocks(
    bus_stack: Stack, bus: BusClient, tiny_llama_long: Path
) -> None:
    worker = bus_stack.start_worker("--num-kv-blocks", "300", model_dir=tiny_llama_long)
    bus.model = tiny_llama_long.name
    total = worker.metric("jetserve:num_total_kv_blocks")
    assert total == 300
    job = bus.make_job(PROMPT * 4, max_tokens=4000, ignore_eos=True)
    await bus.submit(job)
    stream = bus.deltas(job.id)
    await anext(stream)
    await wait_until(lambda: worker.metric("jetserve:num_free_kv_blocks") < total)
    assert worker.metric("jetserve:kv_cache_usage_perc") > 0
    await bus.cancel(job.id)
    rest = [d async for d in stream]
    assert finish_reasons(rest) == {0: "abort"}
    assert sum(len(t) for t in tokens_by_index(rest).values()) < 4000
    await wait_until(lambda: worker.metric("jetserve:num_free_kv_blocks") == total)
    assert worker.metric("jetserve:num_requests_running") == 0
    # The registry says the same within a heartbeat.
    await wait_until(lambda: _registry_free(bus, total), timeout_s=5)
    # A cancel that arrives before the job is pulled: the job is skipped, never run.
    early = bus.make_job(PROMPT, max_tokens=400, ignore_eos=True)
    await bus.cancel(early.id)
    await bus.submit(early)
    deltas = await bus.collect(early.id)
    assert len(deltas) == 1 and deltas[0].finished
    assert finish_reasons(deltas) == {0: "abort"} and tokens_by_index(deltas) == {0: []}


async def _registry_free(bus: BusClient, total: float) -> bool:
    workers = await bus.workers()
    return len(workers) == 1 and workers[0].num_free_blocks == total


async def test_worker_metrics_move(bus_stack: Stack, bus: BusClient, tiny_llama_long: Path) -> None:
    worker = bus_stack.start_worker(model_dir=tiny_llama_long)
    bus.model = tiny_llama_long.name
    before_gen = worker.metric("jetserve:generation_tokens_total")
    before_prompt = worker.metric("jetserve:prompt_tokens_total")
    before_ok = worker.metric("jetserve:request_success_total", finished_reason="length")
    job = bus.make_job(PROMPT, max_tokens=1500, ignore_eos=True)
    await bus.submit(job)
    stream = bus.deltas(job.id)
    await anext(stream)
    running = await wait_until(lambda: worker.metric("jetserve:num_requests_running") == 1)
    assert running
    assert worker.metric("jetserve:kv_cache_usage_perc") > 0
    _ = [d async for d in stream]
    await wait_until(lambda: worker.metric("jetserve:generation_tokens_total") == before_gen + 1500)
    assert worker.metric("jetserve:prompt_tokens_total") == before_prompt + len(PROMPT)
    assert (
        worker.metric("jetserve:request_success_total", finished_reason="length") == before_ok + 1
    )
    assert worker.metric("jetserve:num_requests_running") == 0
    assert worker.metric("jetserve:kv_cache_usage_perc") == 0
    # The same prompt again hits the prefix cache.
    again = bus.make_job(PROMPT * 3, max_tokens=1)
    await bus.submit(again)
    await bus.collect(again.id)
    again2 = bus.make_job(PROMPT * 3, max_tokens=1)
    await bus.submit(again2)
    deltas = await bus.collect(again2.id)
    assert deltas[-1].usage.cached_tokens > 0
    await wait_until(lambda: worker.metric("jetserve:prefix_cache_hit_rate") > 0)


async def test_registry_tokenizer_files_and_clean_exit(bus_stack: Stack, bus: BusClient) -> None:
    worker = bus_stack.start_worker("--max-num-seqs", "3")
    (status,) = await wait_until(bus.workers)
    assert status.model == bus_stack.model_dir.name
    assert status.capacity == 3 and status.max_model_len > 0
    assert status.metrics_port == worker.port
    assert status.num_free_blocks == status.num_total_blocks > 0
    obs = await models_object_store(bus.js, BusSettings())
    stored = await obs.get(model_object_name(status.model, "tokenizer.json"))
    assert stored.data == (bus_stack.model_dir / "tokenizer.json").read_bytes()
    assert worker.get("/health").json()["status"] == "ok"
    assert worker.get("/nope").status_code == 404
    assert worker.stop() == 0
    assert await bus.workers() == []
    assert any(e.get("event") == "worker_stopped" for e in worker.log_events())


async def test_two_workers_share_load_and_lose_nothing(bus_stack: Stack, bus: BusClient) -> None:
    w0 = bus_stack.start_worker("--max-num-seqs", "4")
    w1 = bus_stack.start_worker("--max-num-seqs", "4")
    # Jobs long enough that the first worker to pull cannot finish all 16 before the
    # other's pull arrives (40 tokens each did, once on a fast CPU).
    jobs = [bus.make_job(PROMPT, max_tokens=300, ignore_eos=True) for _ in range(16)]
    for job in jobs:
        await bus.submit(job)
    results = await asyncio.gather(*(bus.collect(job.id) for job in jobs))
    seen_workers = set()
    for deltas in results:
        check_well_formed(deltas)
        assert len(tokens_by_index(deltas)[0]) == 300
        seen_workers |= {d.worker_id for d in deltas}
    assert len(seen_workers) == 2, seen_workers
    assert w0.alive and w1.alive
    await wait_until(lambda: _settled(bus))


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_jobs_of_a_stopped_worker_complete_on_the_other(
    bus_stack: Stack, bus: BusClient, tiny_llama_long: Path, how: str
) -> None:
    """SIGTERM hands unfinished jobs back at once (nak); a killed worker's jobs come back
    after ack_wait. Either way every job finishes, on the surviving worker."""
    flags = ("--max-num-seqs", "4", "--ack-wait", "3", "--drain-timeout", "0")
    workers = [bus_stack.start_worker(*flags, model_dir=tiny_llama_long) for _ in range(2)]
    bus.model = tiny_llama_long.name
    # Long enough to be running still when the stop comes, on a fast CPU too.
    jobs = [bus.make_job(PROMPT, max_tokens=3000, ignore_eos=True, seed=i) for i in range(4)]
    for job in jobs:
        await bus.submit(job)
    streams = [bus.deltas(job.id, timeout_s=120) for job in jobs]
    first = await asyncio.gather(*(anext(s) for s in streams))
    holders = {d.worker_id for d in first}
    doomed = next(w for w in workers if any(h.startswith(w.name + "-") for h in holders))
    survivor = next(w for w in workers if w is not doomed)
    doomed_jobs = {d.job_id for d in first if d.worker_id.startswith(doomed.name + "-")}
    if how == "sigterm":
        assert doomed.stop() == 0
        (handed_back,) = [e for e in doomed.log_events() if e.get("event") == "jobs_handed_back"]
        assert set(handed_back["job_ids"]) == doomed_jobs
    else:
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
    for job, stream in zip(jobs, streams, strict=True):
        rest = [d async for d in stream]
        last = rest[-1]
        assert last.finished and finish_reasons(rest) == {0: "length"}
        assert last.usage.completion_tokens == 3000
        if job.id in doomed_jobs:
            assert last.worker_id.startswith(survivor.name + "-")
    await wait_until(lambda: _settled(bus), timeout_s=15)
    assert survivor.alive
