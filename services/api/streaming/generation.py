"""One request's generation: its jobs, their deltas, and the text each choice gets.

Endpoint-neutral: completions and chat both consume `ChoiceEvent`s. Per choice it runs
incremental detokenization and stop-string matching; a job whose choices have all
stopped on a stop string is cancelled so the worker frees its KV blocks early. Choice
index = prompt index * n + completion index, as OpenAI numbers batched prompts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from services.api.jobs.builder import PreparedRequest
from services.api.jobs.client import JobClient, JobFailed, JobStream
from services.api.model_registry import ServedModel
from services.api.streaming.detokenizer import IncrementalDetokenizer
from services.api.streaming.stop_strings import StopStringMatcher
from services.api.structured.chat_output import ChatOutputParser, ChatPart
from shared.bus.subjects import events_subject
from shared.messages import Delta, Job, TokenLogprobTuple

log = structlog.get_logger("jetserve.api.generation")


@dataclass
class ChoiceEvent:
    """New output of one choice: text that is final, its tokens, maybe a finish reason."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobTuple] | None
    finish_reason: str | None
    event_id: str  # "<job_id>:<seq>" of the delta it came from
    part: ChatPart | None = None  # chat with tools or reasoning: the text, split


@dataclass
class ChoiceState:
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    num_tokens: int = 0
    finish_reason: str | None = None
    output: ChatOutputParser | None = None  # splits tool calls and reasoning off the text
    part: ChatPart | None = None  # what the last feed() split off (with `output`)

    def feed(self, token_ids: list[int], finish_reason: str | None) -> tuple[str, str | None]:
        """New final text of this choice and its finish reason once it has one."""
        self.num_tokens += len(token_ids)
        text, stopped = self.stops.feed(self.detok.add(token_ids))
        reason: str | None = "stop" if stopped else None
        if not stopped and finish_reason is not None:
            tail, stopped = self.stops.feed(self.detok.flush())
            text += tail if stopped else tail + self.stops.flush()
            reason = "stop" if stopped else finish_reason
        if self.output is not None:
            self.part = self.output.feed(text)
            if reason is not None:
                self.part.extend(self.output.finish())
                if reason == "stop" and self.output.num_calls:
                    reason = "tool_calls"
        if reason is not None:
            self.finish_reason = reason
        return text, reason


def new_choice_state(model: ServedModel, prepared: PreparedRequest, scope: str) -> ChoiceState:
    """`scope` ("<job_id>:<choice>") seeds the choice's tool call ids."""
    plan = prepared.output_plan
    return ChoiceState(
        IncrementalDetokenizer(
            model.tokenizer.tokenizer,
            prepared.skip_special_tokens,
            use_decode_stream=not model.tokenizer.byte_fallback_decoder,
        ),
        StopStringMatcher(prepared.stop),
        output=plan.parser(scope) if plan is not None else None,
    )


@dataclass
class Timing:
    """Latency marks on the monotonic clock, for the API's histograms."""

    start: float
    first_token: float | None = None
    end: float | None = None
    max_tokens_in_a_choice: int = 0


@dataclass
class UsageTotals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_time_s: float = 0.0  # summed over the request's jobs, for cost attribution
    gpu_time_s: float = 0.0
    replayed_tokens: int = 0  # re-attach: tokens the client had seen before it came back


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Generation:
    """Runs the jobs of one prepared request; iterate `events()` exactly once."""

    client: JobClient
    model: ServedModel
    prepared: PreparedRequest
    tags: dict[str, str] = field(default_factory=dict)
    request_id: str = field(default_factory=new_job_id)
    timing: Timing = field(default_factory=lambda: Timing(start=time.monotonic()))
    usage: UsageTotals = field(default_factory=UsageTotals)
    streams: list[JobStream] = field(default_factory=list)
    choices: dict[int, ChoiceState] = field(default_factory=dict)
    embeddings: dict[int, list[float]] = field(default_factory=dict)  # prompt index -> vector
    recorded: bool = False  # metrics observed
    attached: bool = False  # follows an existing job (re-attach, jobs API)
    deadline_s: float = 0.0  # the job's deadline, from its submission; 0 = none

    @property
    def n(self) -> int:
        return self.prepared.sampling.n

    def job(self, i: int) -> Job:
        """The Job for prompt `i` (the jobs API publishes it without following it)."""
        return self._job(i, self.prepared.prompts[i])

    def _job(self, i: int, prompt: list[int]) -> Job:
        job_id = self._job_id(i)
        sampling = self.prepared.sampling
        if sampling.seed is None:
            # Always seeded: a worker that takes the job over mid-way then continues
            # exactly as the first one would have (same tokens, no seam in the text).
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        now = time.time()
        return Job(
            id=job_id,
            model=self.model.name,
            prompt_token_ids=prompt,
            sampling=sampling,
            created_at=now,
            deadline=now + self.deadline_s if self.deadline_s > 0 else None,
            reply_to=events_subject(job_id),
            priority=self.prepared.priority,
            tags=dict(self.tags),
        )

    def _job_id(self, i: int) -> str:
        return self.request_id if len(self.prepared.prompts) == 1 else f"{self.request_id}-{i}"

    def _init_choices(self) -> None:
        for i, prompt in enumerate(self.prepared.prompts):
            self.usage.prompt_tokens += len(prompt)
            for c in range(self.n):
                scope = f"{self._job_id(i)}:{c}"
                self.choices[i * self.n + c] = new_choice_state(self.model, self.prepared, scope)

    async def attach(
        self,
        job_id: str,
        replay_through: int = -1,
        superseded_before: int = 0,
        cancel_on_close: bool = True,
    ) -> None:
        """Follow an existing job instead of publishing one (a re-attach, the jobs API).

        Its Deltas are read from the first; those up to `replay_through` rebuild the
        detokenizer and stop-string state without producing events, so the events that
        follow are exactly the ones the original stream would have sent next.
        """
        if len(self.prepared.prompts) != 1:
            raise ValueError("only a request with a single prompt can be re-attached")
        self.request_id = job_id
        self.attached = True
        self.recorded = True  # latency metrics describe the original request, not this one
        self._init_choices()
        job = self._job(0, self.prepared.prompts[0])
        stream = await self.client.attach(job, replay_through, superseded_before, cancel_on_close)
        self.streams.append(stream)

    async def start(self) -> None:
        """Publish every job (subscribed first, so no delta is missed)."""
        self._init_choices()
        try:
            for i, prompt in enumerate(self.prepared.prompts):
                self.streams.append(await self.client.submit(self._job(i, prompt)))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancel whatever is still running (client gone, error, or stop strings)."""
        for s in self.streams:
            s.close()

    async def events(self) -> AsyncIterator[list[ChoiceEvent]]:
        """Batches of choice events (at most one per choice) as deltas arrive."""
        try:
            if len(self.streams) == 1:
                async for deltas in self.streams[0].batches():
                    batch = self._apply_all(0, deltas)
                    if batch:
                        yield batch
            else:
                async for i, deltas in self._merged():
                    batch = self._apply_all(i, deltas)
                    if batch:
                        yield batch
        finally:
            self.timing.end = time.monotonic()
            self.close()

    async def _merged(self) -> AsyncIterator[tuple[int, list[Delta]]]:
        queue: asyncio.Queue[tuple[int, list[Delta] | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, stream: JobStream) -> None:
            try:
                async for deltas in stream.batches():
                    await queue.put((i, deltas))
                await queue.put((i, None))
            except BaseException as e:
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    def _apply_all(self, job_index: int, deltas: list[Delta]) -> list[ChoiceEvent]:
        """Fold several deltas into one event per choice (text and tokens concatenated)."""
        shown_through = self.streams[job_index].replay_through
        if len(deltas) == 1 and deltas[0].seq > shown_through:  # keeping up: one per batch
            events = self._apply(job_index, deltas[0])
            if len(events) > 1:
                events.sort(key=lambda ev: ev.index)
            return events
        merged: dict[int, ChoiceEvent] = {}
        for delta in deltas:
            events = self._apply(job_index, delta)
            if delta.seq <= shown_through:
                # re-attach: the client saw this one before it reconnected
                self.usage.replayed_tokens += sum(len(c.token_ids) for c in delta.chunks)
                continue
            for ev in events:
                prev = merged.get(ev.index)
                if prev is None:
                    merged[ev.index] = ev
                    continue
                prev.text += ev.text
                prev.token_ids = prev.token_ids + ev.token_ids
                if ev.logprobs:
                    prev.logprobs = (prev.logprobs or []) + ev.logprobs
                prev.finish_reason = ev.finish_reason or prev.finish_reason
                prev.event_id = ev.event_id
                if ev.part is not None:
                    prev.part = (prev.part or ChatPart()).extend(ev.part)
        return [merged[i] for i in sorted(merged)]

    def _apply(self, job_index: int, delta: Delta) -> list[ChoiceEvent]:
        if delta.error is not None:
            raise JobFailed(delta.error)
        if delta.embedding is not None:
            self.embeddings[job_index] = delta.embedding
        if delta.usage is not None:
            self.usage.cached_tokens += delta.usage.cached_tokens
            self.usage.queue_time_s += delta.usage.queue_time_s
            self.usage.gpu_time_s += delta.usage.gpu_time_s
        events: list[ChoiceEvent] = []
        eid = f"{delta.job_id}:{delta.seq}"
        n, timing, usage = self.prepared.sampling.n, self.timing, self.usage
        stopped = False
        for chunk in delta.chunks:
            idx = job_index * n + chunk.index
            st = self.choices.get(idx)
            if st is None or st.finish_reason is not None:
                continue  # stopped on a stop string; the rest was cancelled
            if chunk.token_ids and timing.first_token is None:
                timing.first_token = time.monotonic()
            usage.completion_tokens += len(chunk.token_ids)
            text, reason = st.feed(chunk.token_ids, chunk.finish_reason)
            if st.num_tokens > timing.max_tokens_in_a_choice:
                timing.max_tokens_in_a_choice = st.num_tokens
            if reason is not None:
                stopped = True
            if text or reason is not None or chunk.logprobs:
                events.append(
                    ChoiceEvent(idx, text, chunk.token_ids, chunk.logprobs, reason, eid, st.part)
                )
        if stopped and not delta.finished:
            self._cancel_if_all_stopped(job_index)
        return events

    def _cancel_if_all_stopped(self, job_index: int) -> None:
        own = [self.choices[job_index * self.n + c] for c in range(self.n)]
        if all(st.finish_reason is not None for st in own):
            # The client has all it asked for: free the worker's KV blocks now. The
            # worker's final delta still comes, with usage (cached tokens).
            self.streams[job_index].request_cancel()
