"""The async jobs API: submit now, read the result or the resumable stream later.

`POST /v1/jobs` takes a completions or chat body (told apart by `messages`), queues the
job and answers at once with its id; the job waits in JetStream if no worker runs and
completes when one starts. `GET /v1/jobs/{id}` folds the job's Deltas into its status,
text so far and usage; `GET /v1/jobs/{id}/events` is the endpoint's SSE stream, resumable
with Last-Event-ID or `?after=`; `DELETE /v1/jobs/{id}` cancels it, queued or running.
Every replica can serve every job: the request is in the job-records bucket and the
output in LLM_EVENTS. A reader going away never cancels a job here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import structlog
from fastapi import APIRouter, Request
from nats.js.errors import APIError as NatsAPIError
from starlette.responses import JSONResponse, Response

from services.api.errors import bad_request, service_unavailable
from services.api.gateway.admission import current_caller
from services.api.jobs.builder import PreparedRequest
from services.api.jobs.ownership import owned_record
from services.api.jobs.records import JobRecord, put_record
from services.api.model_registry import ServedModel
from services.api.openai.chat import assemble_message, chat_stream
from services.api.openai.completions import completion_stream
from services.api.openai.schemas import ChatCompletionRequest, CompletionRequest
from services.api.request_body import parse_body
from services.api.state import ApiState, api_state, queue_full
from services.api.streaming.generation import Generation, new_choice_state
from services.api.streaming.reattach import attach_generation, request_cursor
from services.api.streaming.sse import EventStreamResponse
from services.api.structured.chat_output import ChatPart
from shared.bus.event_log import Appended, EventLog, append
from shared.bus.jetstream import is_queue_full
from shared.bus.job_events import JobHistory, fold, read_job_events
from shared.bus.subjects import JOBS_STREAM, events_subject
from shared.messages import CompletionChunk, Delta, Usage, encode_delta

log = structlog.get_logger("jetserve.api.jobs_api")
router = APIRouter()

NO_MESSAGE_FOUND = 10057
CANCEL_APPEND_RETRY_S = 5.0


def _parse(endpoint: str, raw: bytes) -> CompletionRequest | ChatCompletionRequest:
    model = ChatCompletionRequest if endpoint == "chat.completions" else CompletionRequest
    return parse_body(model, raw)


async def _load(st: ApiState, job_id: str) -> tuple[JobRecord, Any, ServedModel, PreparedRequest]:
    record = await owned_record(st.job_records, job_id, current_caller())
    req = _parse(record.endpoint, json.dumps(record.body).encode())
    model = await st.resolve(record.model, require_live=False)
    return record, req, model, await st.prepare(req, model)


# -- POST /v1/jobs -----------------------------------------------------------------------
@router.post("/v1/jobs")
async def create_job(request: Request) -> Response:
    st = api_state(request)
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
        body = None  # parse_body reports the JSON error in OpenAI's words
    endpoint = (
        "chat.completions" if isinstance(body, dict) and "messages" in body else "completions"
    )
    req = _parse(endpoint, raw)
    model = await st.resolve(req.model, require_live=False)
    prepared = await st.prepare(req, model)
    if len(prepared.prompts) != 1:
        raise bad_request("a job takes exactly one prompt", param="prompt")
    tags = {"user": req.user} if req.user else {}
    if st.gateway is not None:
        # The key's caps, tokens/min and priority class apply as to any request. Nothing
        # follows an async job to its end, so its token reservation is not refunded.
        admission = await st.gateway.admit(model, prepared, req.user, hold_streams=False)
        prepared, tags = admission.prepared, admission.tags
    gen = Generation(st.jobs, model, prepared, tags=tags, deadline_s=st.settings.job_deadline_s)
    job = gen.job(0)
    record = JobRecord(
        id=job.id,
        model=model.name,
        endpoint=endpoint,
        created_at=job.created_at,
        # The validated request, not the raw body: unknown fields are not stored.
        body=req.model_dump(mode="json", exclude_unset=True),
        prompt_tokens=len(job.prompt_token_ids),
        owner=current_caller().key_id,
    )
    try:
        # Record first: a job must never run that GET and DELETE cannot find.
        await put_record(st.job_records, record)
        record.jobs_seq = await st.jobs.publish_job(job)
        await put_record(st.job_records, record)
    except Exception as e:
        if is_queue_full(e):
            with contextlib.suppress(Exception):
                await st.job_records.delete(job.id)
            raise queue_full(model.name) from e
        log.error("job_submit_failed", job_id=job.id, error=str(e))
        raise service_unavailable(f"could not queue the job: {e}") from e
    log.info("job_submitted", job_id=job.id, model=model.name, endpoint=endpoint)
    return JSONResponse(
        {
            "id": job.id,
            "object": "job",
            "model": model.name,
            "endpoint": endpoint,
            "status": "queued",
            "created_at": record.created_at,
        },
        status_code=202,
    )


# -- GET /v1/jobs/{id} -------------------------------------------------------------------
def _choice_texts(
    model: ServedModel, prepared: PreparedRequest, deltas: list[Delta], job_id: str
) -> dict[int, tuple[list[ChatPart], str | None]]:
    """(text so far, split as chat splits it; finish reason) of each choice, by the same
    rules the streams apply."""
    choices = {
        i: new_choice_state(model, prepared, f"{job_id}:{i}") for i in range(prepared.sampling.n)
    }
    texts: dict[int, list[ChatPart]] = {i: [] for i in choices}
    history = JobHistory("")
    for delta in deltas:
        if not fold(history, delta):
            continue  # a duplicate seq
        for chunk in delta.chunks:
            st = choices.get(chunk.index)
            if st is None or st.finish_reason is not None or chunk.finish_reason == "error":
                continue  # an error is the job's state, not the end of a choice's text
            text, _ = st.feed(chunk.token_ids, chunk.finish_reason)
            texts[chunk.index].append(st.part if st.part is not None else ChatPart(text))
    return {i: (texts[i], st.finish_reason) for i, st in choices.items()}


def job_status(
    history: JobHistory, finish_reasons: list[str | None], queued_too_long: bool = False
) -> str:
    if history.num_deltas == 0:
        # Past the queue's age limit a job that never started has left LLM_JOBS.
        return "expired" if queued_too_long else "queued"
    if not history.finished:
        return "running"
    if history.error is not None:
        return "failed"
    if any(reason in (None, "abort") for reason in finish_reasons):
        return "cancelled"
    return "completed"


def job_view(
    record: JobRecord,
    model: ServedModel,
    prepared: PreparedRequest,
    deltas: list[Delta],
    queue_max_age_s: float = 0.0,
) -> dict[str, Any]:
    history = JobHistory(record.id)
    for delta in deltas:
        fold(history, delta)
    choices = _choice_texts(model, prepared, deltas, record.id)
    out_choices = []
    for i, (parts, reason) in sorted(choices.items()):
        choice: dict[str, Any] = {"index": i, "finish_reason": reason}
        if record.endpoint == "chat.completions":
            choice["message"] = assemble_message(parts).model_dump()
        else:
            choice["text"] = "".join(p.content for p in parts)
        choice["completion_tokens"] = len(history.token_ids.get(i, []))
        out_choices.append(choice)
    cached = history.usage.cached_tokens if history.usage is not None else 0
    return {
        "id": record.id,
        "object": "job",
        "model": record.model,
        "endpoint": record.endpoint,
        "status": job_status(
            history,
            [reason for _, reason in choices.values()],
            0 < queue_max_age_s < time.time() - record.created_at,
        ),
        "created_at": record.created_at,
        "choices": out_choices,
        "usage": {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": history.num_tokens,
            "total_tokens": record.prompt_tokens + history.num_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
        "error": history.error,
        "last_event_id": f"{record.id}:{history.next_seq - 1}" if history.num_deltas else None,
        "workers": history.worker_ids,
    }


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> Response:
    st = api_state(request)
    record, _req, model, prepared = await _load(st, job_id)
    deltas, _ = await read_job_events(st.js, job_id)
    # Folding and detokenizing a long job is CPU work: off the event loop.
    view = await asyncio.get_running_loop().run_in_executor(
        st.tokenizer_pool, job_view, record, model, prepared, deltas, st.settings.queue_max_age_s
    )
    return JSONResponse(view)


# -- GET /v1/jobs/{id}/events ---------------------------------------------------------------
@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> Response:
    st = api_state(request)
    _record, req, model, prepared = await _load(st, job_id)
    cursor = request_cursor(request, job_id)
    shown = cursor[1] if cursor is not None else -1
    gen = await attach_generation(
        st, model, prepared, job_id, shown, False, route="job_events", checked=True
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if isinstance(req, ChatCompletionRequest):
        top = (req.top_logprobs or 0) if req.logprobs else None
        events = chat_stream(gen, include_usage, top)
    else:
        events = completion_stream(gen, include_usage, req.logprobs)
    return EventStreamResponse(events, on_close=lambda: st.finish(gen))


# -- DELETE /v1/jobs/{id} ---------------------------------------------------------------------
@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> Response:
    """Cancel, queued or running.

    A running job is aborted by its worker (cancel message). A job still in LLM_JOBS is
    deleted there, which also covers a queue with no worker to hear the cancel; its
    stream is then closed with an abort Delta appended on the log's tail. If a worker
    started it meanwhile, exactly one of the two appends wins the fence: either the
    worker finds the log closed and drops the job, or our append is refused and the
    worker's own abort closes the stream.
    """
    st = api_state(request)
    record, _req, model, prepared = await _load(st, job_id)
    deltas, last_seq = await read_job_events(st.js, job_id)
    history = JobHistory(job_id)
    for delta in deltas:
        fold(history, delta)
    if history.terminal:
        return JSONResponse(job_view(record, model, prepared, deltas))
    st.jobs.cancel(job_id)
    removed = False
    if record.jobs_seq:
        try:
            removed = await st.js.delete_msg(JOBS_STREAM, record.jobs_seq)
        except NatsAPIError as e:
            if e.err_code != NO_MESSAGE_FOUND:
                raise service_unavailable(f"could not cancel the job: {e}") from e
    closed = False
    if removed:
        abort = Delta(
            job_id=job_id,
            seq=history.next_seq,
            chunks=[
                CompletionChunk(index=i, token_ids=[], finish_reason="abort")
                for i in range(prepared.sampling.n)
            ],
            finished=True,
            usage=Usage(
                prompt_tokens=record.prompt_tokens,
                completion_tokens=history.num_tokens,
                cached_tokens=0,
                queue_time_s=max(time.time() - record.created_at, 0.0),
                gpu_time_s=0.0,
            ),
        )
        log_ = EventLog(events_subject(job_id), fence=last_seq)
        result = await append(st.js, log_, encode_delta(abort), CANCEL_APPEND_RETRY_S)
        closed = result is Appended.STORED
    log.info("job_cancel_requested", job_id=job_id, removed_from_queue=removed, closed=closed)
    deltas, _ = await read_job_events(st.js, job_id)
    view = job_view(record, model, prepared, deltas)
    if view["status"] in ("queued", "running"):
        view["status"] = "cancelling"  # the worker's abort Delta is on its way
    return JSONResponse(view)
