"""POST /v1/completions output: SSE chunks or one response, from a running Generation."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from services.api.openai.format import extend_completion_logprobs, usage_info
from services.api.openai.schemas import CompletionChoice, CompletionLogprobs, CompletionResponse
from services.api.streaming.event_stream import collect_events, sse_body
from services.api.streaming.generation import ChoiceEvent, Generation


def completion_id(gen: Generation) -> str:
    return f"cmpl-{gen.request_id}"


_MARK = "@@jetserve-text@@"


def _text_template(rid: str, created: int, model: str, index: int) -> tuple[str, str]:
    """A streamed chunk's JSON before and after its text, as the schema renders it."""
    choice = CompletionChoice(index=index, text=_MARK, logprobs=None, finish_reason=None)
    rendered = CompletionResponse(id=rid, created=created, model=model, choices=[choice])
    before, _, after = rendered.model_dump_json().partition(json.dumps(_MARK))
    return before, after


def completion_stream(
    gen: Generation, include_usage: bool, logprobs: int | None
) -> AsyncIterator[bytes]:
    rid, created, model = completion_id(gen), int(time.time()), gen.model.name
    texts = gen.model.token_texts
    offsets: dict[int, int] = {}

    templates: dict[int, tuple[str, str]] = {}

    def render(ev: ChoiceEvent) -> str:
        if ev.finish_reason is None and not (logprobs is not None and ev.logprobs):
            # The hot path, one chunk per token: the chunk's JSON around its text is the
            # same every time, so it is rendered once per choice and the text spliced in.
            pre_post = templates.get(ev.index)
            if pre_post is None:
                pre_post = templates[ev.index] = _text_template(rid, created, model, ev.index)
            return pre_post[0] + json.dumps(ev.text, ensure_ascii=False) + pre_post[1]
        lp = None
        if logprobs is not None and ev.logprobs:
            lp = CompletionLogprobs()
            offsets[ev.index] = extend_completion_logprobs(
                lp, ev.logprobs, texts, logprobs, offsets.get(ev.index, 0)
            )
        choice = CompletionChoice(
            index=ev.index, text=ev.text, logprobs=lp, finish_reason=ev.finish_reason
        )
        return CompletionResponse(
            id=rid, created=created, model=model, choices=[choice]
        ).model_dump_json()

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
