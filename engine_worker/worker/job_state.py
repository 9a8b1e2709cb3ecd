"""A job while a worker holds it, and the transforms between engine outputs and Deltas.

Kept apart from the NATS loop so the mapping (seq numbering, usage accounting, logprob
tuples) is plain, testable functions. `next_seq`, `produced` and the event-log fence are
what a worker that takes over a redelivered job rebuilds from LLM_EVENTS
(`state_from_history`): numbering and token counts continue where the last worker stopped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from engine_worker.engine.outputs import CompletionDelta, RequestOutput
from shared.bus.event_log import EventLog
from shared.bus.job_events import JobHistory
from shared.bus.subjects import events_subject
from shared.messages import CompletionChunk, Delta, Job, Usage
from shared.sampling_params import SamplingParams


@dataclass
class JobState:
    job: Job
    msg: Any  # the nats Msg to ack, term or nak; replaced if the same job is redelivered
    added_at: float = field(default_factory=time.time)  # unix seconds, when handed to the engine
    next_seq: int = 0
    produced: dict[int, int] = field(default_factory=dict)  # completion index -> tokens sent
    gpu_time_s: float = 0.0
    finished: bool = False
    prompt_counted: bool = False
    request_id: str = ""  # the engine request of this admission (job id + admission count)
    events: EventLog | None = None  # the job's log in LLM_EVENTS and its publish fence
    resume_token_ids: list[list[int]] | None = None  # tokens other workers already produced
    lost: bool = False  # another worker appended to the job's log: stop, do not ack
    # Started before its log was read (a first delivery): the first append's fence (an
    # empty log) is the check, and a conflict there means the log had Deltas after all
    # (a replayed dead letter, a job cancelled while queued): the job is restarted from it.
    optimistic: bool = False
    held: list[CompletionChunk] = field(default_factory=list)  # stream interval: not sent yet

    def __post_init__(self) -> None:
        if self.events is None:
            self.events = EventLog(events_subject(self.job.id))

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def completion_tokens(self) -> int:
        return sum(self.produced.values())


def state_from_history(job: Job, msg: Any, history: JobHistory) -> JobState:
    """A job's state after the Deltas already stored: numbering, counts and the fence."""
    state = JobState(job, msg, next_seq=history.next_seq)
    assert state.events is not None
    state.events.fence = history.last_stream_seq
    n = max(job.sampling.n, 1)
    resume = history.resume_token_ids(n)
    state.produced = {i: len(t) for i, t in enumerate(resume) if t}
    if any(resume):
        state.resume_token_ids = resume
    return state


def sampling_params(job: Job) -> SamplingParams:
    """A copy, so the engine never shares mutable lists with the decoded message."""
    return dataclasses.replace(job.sampling, stop_token_ids=list(job.sampling.stop_token_ids))


def _chunk(d: CompletionDelta) -> CompletionChunk:
    return CompletionChunk(
        index=d.index,
        token_ids=list(d.token_ids),
        logprobs=None
        if d.logprobs is None
        else [(lp.token_id, lp.logprob, list(lp.top)) for lp in d.logprobs],
        finish_reason=d.finish_reason,
    )


def _usage(state: JobState, num_prompt_tokens: int, num_cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=state.completion_tokens,
        cached_tokens=num_cached_tokens,
        # Time the job spent in the queue before this worker handed it to its engine.
        queue_time_s=max(state.added_at - state.job.created_at, 0.0),
        gpu_time_s=state.gpu_time_s,
    )


def merge_chunks(held: list[CompletionChunk], then: list[CompletionChunk]) -> list[CompletionChunk]:
    """One chunk per completion index: `held`'s tokens and logprobs, then `then`'s.

    Extends `held`'s chunks in place (a job's held chunks are its own), so holding costs
    each step only its new tokens, not a copy of all the held ones."""
    merged = {c.index: c for c in held}
    for c in then:
        prev = merged.get(c.index)
        if prev is None:
            merged[c.index] = c
            continue
        prev.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            prev.logprobs = c.logprobs if prev.logprobs is None else prev.logprobs + c.logprobs
        prev.finish_reason = c.finish_reason or prev.finish_reason
    return list(merged.values())


def delta_from_output(
    state: JobState, out: RequestOutput, worker_id: str, stream_interval: int = 1
) -> Delta | None:
    """Turn one engine step's output for a job into the job's next Delta (mutates state).

    With `stream_interval` N > 1 the output's chunks are held (None) until a completion
    has N unsent tokens; a job's first Delta and its last are never held. Held tokens
    are not stored, so a worker that dies with some simply makes them again: takeover
    continues after the stored tokens, and the job's seed makes them the same ones.
    """
    chunks = [_chunk(d) for d in out.deltas]
    if state.held:
        chunks, state.held = merge_chunks(state.held, chunks), []
    if (
        stream_interval > 1
        and not out.finished
        and state.next_seq > 0
        and out.embedding is None
        and max((len(c.token_ids) for c in chunks), default=0) < stream_interval
    ):
        state.held = chunks
        return None
    for c in chunks:
        state.produced[c.index] = state.produced.get(c.index, 0) + len(c.token_ids)
    delta = Delta(
        job_id=state.id,
        seq=state.next_seq,
        chunks=chunks,
        finished=out.finished,
        usage=_usage(state, out.num_prompt_tokens, out.num_cached_tokens) if out.finished else None,
        worker_id=worker_id,
        embedding=out.embedding,
    )
    state.next_seq += 1
    state.finished = out.finished
    return delta


def final_delta(
    state: JobState, finish_reason: str, worker_id: str, error: str | None = None
) -> Delta:
    """Close a job the engine never finished (cancelled before start, rejected, failed)."""
    n = max(state.job.sampling.n, 1)
    delta = Delta(
        job_id=state.id,
        seq=state.next_seq,
        chunks=[
            CompletionChunk(index=i, token_ids=[], finish_reason=finish_reason) for i in range(n)
        ],
        finished=True,
        usage=_usage(state, len(state.job.prompt_token_ids), 0),
        error=error,
        worker_id=worker_id,
    )
    state.next_seq += 1
    state.finished = True
    return delta


def error_delta(job_id: str, error: str, worker_id: str) -> Delta:
    """For a message too broken to decode: the id comes from its Nats-Msg-Id header."""
    return Delta(
        job_id=job_id,
        seq=0,
        chunks=[CompletionChunk(index=0, token_ids=[], finish_reason="error")],
        finished=True,
        error=error,
        worker_id=worker_id,
    )
