"""The async jobs API against real processes: queue without workers, status, resumable
events, cancel queued and running jobs."""

from __future__ import annotations

import time

import httpx

from services.api.streaming.sse import parse_event_id
from tests.support.faults import StreamRead, read_stream
from tests.support.polling import wait_for
from tests.support.stack import Stack

PROMPT = "The quick brown fox"


async def _job(api: httpx.AsyncClient, job_id: str) -> dict:
    resp = await api.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _status_is(api: httpx.AsyncClient, job_id: str, status: str) -> dict | None:
    job = await _job(api, job_id)
    return job if job["status"] == status else None


async def test_jobs_api_lifecycle(bus_stack: Stack) -> None:
    model = bus_stack.model_dir.name
    worker = bus_stack.start_worker("--max-num-seqs", "2")
    api_proc = bus_stack.start_api()
    assert worker.stop() == 0  # no worker runs now; its tokenizer stays in the object store
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 30,
        "temperature": 0.8,
        "seed": 7,
        "ignore_eos": True,
        "n": 2,
    }
    chat_body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    async with httpx.AsyncClient(base_url=api_proc.url, timeout=60) as api:
        # Submitted while no worker runs: accepted at once, queued.
        t0 = time.monotonic()
        created = await api.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        assert time.monotonic() - t0 < 2
        job_id = created.json()["id"]
        chat_id = (await api.post("/v1/jobs", json=chat_body)).json()["id"]
        doomed_id = (await api.post("/v1/jobs", json=body)).json()["id"]
        assert (await _job(api, job_id))["status"] == "queued"
        # Cancel a queued job with nobody to hear a cancel message: it leaves the queue.
        cancelled = (await api.delete(f"/v1/jobs/{doomed_id}")).json()
        assert cancelled["status"] == "cancelled"
        assert (await api.get("/v1/jobs/nope")).status_code == 404
        bad = await api.post("/v1/jobs", json={**body, "prompt": ["a", "b"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
        unknown = await api.post("/v1/jobs", json={**body, "model": "no-such-model"})
        assert unknown.status_code == 404

        # A worker starts: the queued jobs complete.
        bus_stack.start_worker("--max-num-seqs", "2")
        done = await wait_for(lambda: _status_is(api, job_id, "completed"), timeout_s=60)
        assert [c["completion_tokens"] for c in done["choices"]] == [30, 30]
        assert done["usage"]["completion_tokens"] == 60
        # The same request through the synchronous endpoint gives the same text.
        sync = (await api.post("/v1/completions", json=body)).json()
        assert [c["text"] for c in done["choices"]] == [c["text"] for c in sync["choices"]]
        chat = await wait_for(lambda: _status_is(api, chat_id, "completed"), timeout_s=60)
        assert chat["choices"][0]["message"]["content"]
        # The cancelled one never ran.
        gone = await _job(api, doomed_id)
        assert gone["status"] == "cancelled" and gone["usage"]["completion_tokens"] == 0

        # Events: the whole stream, then resumed after an event (header or query).
        full = await read_stream(api, "GET", f"/v1/jobs/{job_id}/events", StreamRead())
        assert full.done and not full.broken
        assert full.texts() == {c["index"]: c["text"] for c in done["choices"]}
        ids = [e.id for e in full.events if e.id]
        cut = ids[len(ids) // 2]
        # A Delta's events share its id (one per choice here, n=2): resuming after an id
        # resumes after all of them.
        cut_at = max(i for i, e in enumerate(full.events) if e.id == cut)
        head = StreamRead(events=full.events[: cut_at + 1])
        after = [i for i in ids if parse_event_id(i)[1] > parse_event_id(cut)[1]]
        for how in ("header", "query"):
            rest = StreamRead()
            if how == "header":
                await read_stream(
                    api, "GET", f"/v1/jobs/{job_id}/events", rest, headers={"Last-Event-ID": cut}
                )
            else:
                await read_stream(api, "GET", f"/v1/jobs/{job_id}/events?after={cut}", rest)
            assert rest.done
            assert [e.id for e in rest.events if e.id] == after
            joined = {i: head.texts().get(i, "") + rest.texts().get(i, "") for i in (0, 1)}
            assert joined == full.texts()
        bad_cursor = await api.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
        assert bad_cursor.status_code == 400

        # Cancel a running job: it stops early and its stream ends.
        long = await api.post("/v1/jobs", json={**body, "max_tokens": 400, "n": 1})
        long_id = long.json()["id"]
        await wait_for(lambda: _status_is(api, long_id, "running"), timeout_s=30)
        assert (await api.delete(f"/v1/jobs/{long_id}")).status_code == 200
        stopped = await wait_for(lambda: _status_is(api, long_id, "cancelled"), timeout_s=30)
        assert stopped["choices"][0]["completion_tokens"] < 400
        tail = await read_stream(api, "GET", f"/v1/jobs/{long_id}/events", StreamRead())
        assert tail.done and tail.finish_reasons() == {0: "abort"}
