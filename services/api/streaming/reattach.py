"""Re-attaching a client to a job it already started: `Last-Event-ID` or `?after=`.

Every SSE event carries `id: <job_id>:<seq>`. A client that lost its connection (or
whose API replica died) sends the same request again with the last id it saw, as a
`Last-Event-ID` header (what EventSource does) or an `after` query parameter, to any
replica. No new job is queued: the replica follows the job's Deltas in LLM_EVENTS from
the first, rebuilds the text state silently up to that event, and streams what comes
after, so the client sees every event exactly once, also after the job has finished
(within the event retention).

A re-attach is a request like any other: the job must belong to the caller's key (a
stranger, like an unknown id, gets a 404 at once, before anything is subscribed), it
counts against the key's concurrency and open streams, and what it delivers is metered.
"""

from __future__ import annotations

from starlette.requests import Request

from services.api.errors import bad_request
from services.api.gateway.admission import current_caller
from services.api.jobs.builder import PreparedRequest
from services.api.jobs.ownership import owned_record
from services.api.model_registry import ServedModel
from services.api.state import ApiState
from services.api.streaming.generation import Generation
from services.api.streaming.sse import parse_event_id
from shared.bus.job_events import last_delta
from shared.bus.subjects import events_subject

LAST_EVENT_ID = "last-event-id"


def parse_cursor(raw: str, job_id: str | None = None) -> tuple[str, int]:
    """`<job_id>:<seq>` (or a bare `<seq>` when the job is known) -> (job id, seq)."""
    try:
        if job_id is not None and ":" not in raw:
            cursor = (job_id, int(raw))
        else:
            cursor = parse_event_id(raw)
        events_subject(cursor[0])  # validates the id
    except ValueError:
        raise bad_request(
            f"invalid event id {raw[:80]!r}: expected '<job_id>:<seq>' as sent in the stream",
            param="Last-Event-ID",
        ) from None
    if cursor[1] < -1:
        raise bad_request("the event sequence must be >= -1", param="Last-Event-ID")
    if job_id is not None and cursor[0] != job_id:
        raise bad_request("the event id belongs to another job", param="Last-Event-ID")
    return cursor


def request_cursor(request: Request, job_id: str | None = None) -> tuple[str, int] | None:
    raw = request.headers.get(LAST_EVENT_ID) or request.query_params.get("after")
    return None if not raw else parse_cursor(raw.strip(), job_id)


async def reattach_cursor(st: ApiState, request: Request) -> tuple[str, int] | None:
    """The request's cursor, once the job it names is known to belong to the caller: an
    unknown or foreign job is a 404 here, before the body is tokenized."""
    cursor = request_cursor(request)
    if cursor is not None:
        await owned_record(st.job_records, cursor[0], current_caller())
    return cursor


async def attach_generation(
    st: ApiState,
    model: ServedModel,
    prepared: PreparedRequest,
    job_id: str,
    shown_through: int,
    cancel_on_close: bool,
    route: str = "reattach",
    checked: bool = False,
) -> Generation:
    """A Generation that follows job `job_id`, showing what comes after `shown_through`.

    `checked`: the caller already loaded the job's record through `owned_record`.
    """
    if not checked:
        await owned_record(st.job_records, job_id, current_caller())
    if len(prepared.prompts) != 1:
        raise bad_request(
            "a request with several prompts cannot be re-attached; send one prompt per request",
            param="prompt",
        )
    admission = st.gateway.admit_reattach(prepared, route) if st.gateway is not None else None
    try:
        # An error Delta followed by more (a dead letter that was replayed) no longer ends
        # the job: only an error that is the newest Delta does.
        newest = await last_delta(st.js, job_id)
        gen = Generation(st.jobs, model, prepared)
        await gen.attach(
            job_id,
            replay_through=shown_through,
            superseded_before=newest.seq if newest is not None else 0,
            cancel_on_close=cancel_on_close,
        )
    except BaseException:
        if admission is not None and st.gateway is not None:
            st.gateway.streams.release(admission.caller.key_id, admission.streams)
        raise
    if admission is not None and st.gateway is not None:
        st.gateway.attach(gen, admission)
    return gen


async def open_generation(
    st: ApiState,
    cursor: tuple[str, int] | None,
    model: ServedModel,
    prepared: PreparedRequest,
    user: str | None,
    stream: bool,
    endpoint: str = "completions",
) -> Generation:
    """A new job, or, with a cursor, the job the client re-attaches to.

    A non-streaming request with a cursor gets the whole result of that job.
    """
    if cursor is None:
        return await st.start_generation(model, prepared, user, endpoint)
    job_id, seq = cursor
    return await attach_generation(
        st, model, prepared, job_id, seq if stream else -1, True, checked=True
    )
