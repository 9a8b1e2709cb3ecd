"""POST /v1/completions output: SSE chunks or one response, from a running Generation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.api.openai.chunk_template import Template, splice, text_template
from services.api.openai.format import extend_completion_logprobs, usage_info
from services.api.openai.schemas import CompletionChoice, CompletionLogprobs, CompletionResponse
from services.api.streaming.event_stream import collect_events, sse_body
from services.api.streaming.generation import ChoiceEvent, Generation


def completion_id(gen: Generation) -> str:
    return f"cmpl-{gen.request_id}"


def completion_stream(
    gen: Generation, include_usage: bool, logprobs: int | None
) -> AsyncIterator[bytes]:
    rid, created, model = completion_id(gen), int(time.time()), gen.model.name
    texts = gen.model.token_texts
    offsets: dict[int, int] = {}

    templates: dict[int, Template] = {}

    def chunk(
        index: int, text: str, lp: CompletionLogprobs | None = None, reason: str | None = None
    ) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=reason)
        return CompletionResponse(
            id=rid, created=created, model=model, choices=[choice]
        ).model_dump_json()

    def render(ev: ChoiceEvent) -> str:
        if ev.finish_reason is None and not (logprobs is not None and ev.logprobs):
            # The hot path, one chunk per token (chunk_template.py).
            template = templates.get(ev.index)
            if template is None:
                template = templates[ev.index] = text_template(lambda t: chunk(ev.index, t))
            return splice(template, ev.text)
        lp = None
        if logprobs is not None and ev.logprobs:
            lp = CompletionLogprobs()
            offsets[ev.index] = extend_completion_logprobs(
                lp, ev.logprobs, texts, logprobs, offsets.get(ev.index, 0)
            )
        return chunk(ev.index, ev.text, lp, ev.finish_reason)

    def usage_chunk() -> str:
        return CompletionResponse(
            id=rid, created=created, model=model, choices=[], usage=usage_info(gen.usage)
        ).model_dump_json()

    return sse_body(gen, render, usage_chunk=usage_chunk if include_usage else None)


async def completion_response(gen: Generation, logprobs: int | None) -> CompletionResponse:
    texts = gen.model.token_texts
    parts: dict[int, list[str]] = {i: [] for i in gen.choices}
    lps: dict[int, CompletionLogprobs] = {i: CompletionLogprobs() for i in gen.choices}
    offsets: dict[int, int] = dict.fromkeys(gen.choices, 0)

    def take(ev: ChoiceEvent) -> None:
        parts[ev.index].append(ev.text)
        if logprobs is not None and ev.logprobs:
            offsets[ev.index] = extend_completion_logprobs(
                lps[ev.index], ev.logprobs, texts, logprobs, offsets[ev.index]
            )

    finish = await collect_events(gen, take)
    return CompletionResponse(
        id=completion_id(gen),
        model=gen.model.name,
        choices=[
            CompletionChoice(
                index=i,
                text="".join(parts[i]),
                logprobs=lps[i] if logprobs is not None else None,
                finish_reason=finish[i],
            )
            for i in sorted(parts)
        ],
        usage=usage_info(gen.usage),
    )
