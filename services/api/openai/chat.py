"""POST /v1/chat/completions output: SSE chunks or one response, from a running Generation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.api.openai.chunk_template import Template, splice, text_template
from services.api.openai.format import chat_logprob_entries, chat_logprobs, usage_info
from services.api.openai.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ChatTokenLogprob,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)
from services.api.streaming.event_stream import collect_events, sse_body
from services.api.streaming.generation import ChoiceEvent, Generation
from services.api.structured.chat_output import ChatPart


def part_delta(part: ChatPart) -> ChatDelta:
    """One stream delta with whatever the text split into: reasoning, content, calls."""
    calls = [
        ToolCallDelta(
            index=c.index,
            id=c.id,
            type="function" if c.id is not None else None,
            function=FunctionCallDelta(name=c.name, arguments=c.arguments),
        )
        for c in part.calls
    ]
    return ChatDelta(
        content=part.content or None,
        reasoning_content=part.reasoning or None,
        tool_calls=calls or None,
    )


def assemble_message(parts: list[ChatPart]) -> ChatMessageOut:
    """The non-streamed message: the same pieces a stream sends, joined."""
    content = "".join(p.content for p in parts)
    reasoning = "".join(p.reasoning for p in parts)
    calls: dict[int, ToolCall] = {}
    for piece in (c for p in parts for c in p.calls):
        call = calls.get(piece.index)
        if call is None:
            calls[piece.index] = ToolCall(
                id=piece.id or "",
                function=FunctionCall(name=piece.name or "", arguments=piece.arguments),
            )
        else:
            call.function.arguments += piece.arguments
    return ChatMessageOut(
        content=None if calls and not content.strip() else content,
        reasoning_content=reasoning or None,
        tool_calls=[calls[i] for i in sorted(calls)] or None,
    )


def chat_id(gen: Generation) -> str:
    return f"chatcmpl-{gen.request_id}"


def chat_stream(
    gen: Generation, include_usage: bool, top_logprobs: int | None
) -> AsyncIterator[bytes]:
    """top_logprobs: None when logprobs were not requested, else k (0 allowed)."""
    rid, created, model = chat_id(gen), int(time.time()), gen.model.name
    texts = gen.model.token_texts

    def chunk(choice: ChatChunkChoice) -> str:
        return ChatCompletionChunk(
            id=rid, created=created, model=model, choices=[choice]
        ).model_dump_json()

    resumed = gen.attached and gen.streams[0].replay_through >= 0
    # A re-attached client got the role chunks before it reconnected.
    prelude = [
        chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
        for i in ([] if resumed else sorted(gen.choices))
    ]

    templates: dict[int, Template] = {}  # a choice's content chunk around its text
    empty: dict[int, str] = {}  # a choice's chunk with an empty delta (text held back)

    def content_only(ev: ChoiceEvent) -> str | None:
        """The chunk's content when that is all it carries (no reasoning, tool call,
        logprobs or finish reason), else None."""
        if ev.finish_reason is not None or (top_logprobs is not None and ev.logprobs):
            return None
        if ev.part is None:
            return ev.text
        return None if ev.part.reasoning or ev.part.calls else ev.part.content

    def render(ev: ChoiceEvent) -> str:
        content = content_only(ev)
        if content is not None:
            # The hot path, one chunk per token (chunk_template.py).
            if not content:
                text = empty.get(ev.index)
                if text is None:
                    text = empty[ev.index] = chunk(
                        ChatChunkChoice(index=ev.index, delta=ChatDelta())
                    )
                return text
            template = templates.get(ev.index)
            if template is None:
                template = templates[ev.index] = text_template(
                    lambda t: chunk(ChatChunkChoice(index=ev.index, delta=ChatDelta(content=t)))
                )
            return splice(template, content)
        lp = None
        if top_logprobs is not None and ev.logprobs:
            lp = chat_logprobs(chat_logprob_entries(ev.logprobs, texts, top_logprobs))
        if ev.part is not None:
            delta = part_delta(ev.part)
        else:
            delta = ChatDelta(content=ev.text) if ev.text else ChatDelta()
        return chunk(
            ChatChunkChoice(
                index=ev.index,
                delta=delta,
                logprobs=lp,
                finish_reason=ev.finish_reason,
            )
        )

    def usage_chunk() -> str:
        return ChatCompletionChunk(
            id=rid, created=created, model=model, choices=[], usage=usage_info(gen.usage)
        ).model_dump_json()

    return sse_body(gen, render, prelude, usage_chunk if include_usage else None)


async def chat_response(gen: Generation, top_logprobs: int | None) -> ChatCompletionResponse:
    texts = gen.model.token_texts
    parts: dict[int, list[ChatPart]] = {i: [] for i in gen.choices}
    lps: dict[int, list[ChatTokenLogprob]] = {i: [] for i in gen.choices}

    def take(ev: ChoiceEvent) -> None:
        parts[ev.index].append(ev.part if ev.part is not None else ChatPart(ev.text))
        if top_logprobs is not None and ev.logprobs:
            lps[ev.index].extend(chat_logprob_entries(ev.logprobs, texts, top_logprobs))

    finish = await collect_events(gen, take)
    return ChatCompletionResponse(
        id=chat_id(gen),
        model=gen.model.name,
        choices=[
            ChatChoice(
                index=i,
                message=assemble_message(parts[i]),
                logprobs=chat_logprobs(lps[i]) if top_logprobs is not None else None,
                finish_reason=finish[i],
            )
            for i in sorted(parts)
        ],
        usage=usage_info(gen.usage),
    )
