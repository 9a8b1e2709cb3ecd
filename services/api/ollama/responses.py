"""/api/generate and /api/chat output: NDJSON lines or one object, from a running Generation.

Each streamed line is one JSON object; the last has `done: true`, the `done_reason`,
token counts and durations in nanoseconds, as Ollama sends them. A job that fails after
the stream started ends it with an `{"error": ...}` line, which Ollama clients raise.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.api.errors import internal_error
from services.api.jobs.client import JobFailed
from services.api.ollama.prompts import OllamaPrompt
from services.api.streaming.generation import Generation
from services.api.streaming.token_text import TokenTexts
from services.api.structured.tool_parsers import CallPiece
from shared.messages import TokenLogprobTuple

NDJSON_MEDIA_TYPE = "application/x-ndjson"
NS = 1_000_000_000
# engine finish reason -> Ollama done_reason
DONE_REASONS = {"stop": "stop", "length": "length", "abort": "stop", "tool_calls": "stop"}


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def ollama_name(model: str) -> str:
    """Ollama names carry a tag; a served name without one is `:latest`."""
    return model if ":" in model else f"{model}:latest"


@dataclass
class Parsed:
    """Output split as Ollama returns it: content, thinking and complete tool calls."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.thinking or self.tool_calls)

    def extend(self, other: Parsed) -> None:
        self.content += other.content
        self.thinking += other.thinking
        self.tool_calls += other.tool_calls


@dataclass
class Piece:
    """What one batch of choice events adds to the response."""

    parsed: Parsed
    logprobs: list[TokenLogprobTuple] | None = None


@dataclass
class Collected:
    parsed: Parsed = field(default_factory=Parsed)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobTuple] = field(default_factory=list)
    finish_reason: str | None = None
    calls: dict[int, CallPiece] = field(default_factory=dict)  # tool calls being streamed

    def add_calls(self, pieces: list[CallPiece]) -> None:
        for p in pieces:
            call = self.calls.setdefault(p.index, CallPiece(p.index))
            call.name = call.name or p.name
            call.arguments += p.arguments

    def complete_calls(self) -> list[dict[str, Any]]:
        """Ollama sends whole calls with arguments as JSON objects, once the output ended."""
        out = []
        for _, call in sorted(self.calls.items()):
            try:
                arguments = json.loads(call.arguments or "{}")
            except ValueError:
                arguments = {}
            out.append({"function": {"name": call.name or "", "arguments": arguments}})
        self.calls.clear()
        return out


async def pieces(gen: Generation, out: Collected) -> AsyncIterator[Piece]:
    """The split output as it arrives (the Generation splits reasoning and tool calls off
    the text by the request's output plan, as for the OpenAI routes); `out` accumulates
    ids, logprobs and the finish reason."""
    async for batch in gen.events():
        for ev in batch:
            if ev.part is None:
                parsed = Parsed(content=ev.text)
            else:
                parsed = Parsed(content=ev.part.content, thinking=ev.part.reasoning)
                out.add_calls(ev.part.calls)
            out.token_ids += ev.token_ids
            if ev.logprobs:
                out.logprobs += ev.logprobs
            if ev.finish_reason is not None:
                out.finish_reason = ev.finish_reason
                parsed.tool_calls = out.complete_calls()
            out.parsed.extend(parsed)
            if parsed or ev.logprobs:
                yield Piece(parsed, ev.logprobs)


def final_fields(gen: Generation, finish_reason: str | None) -> dict[str, Any]:
    t = gen.timing
    end = t.end or time.monotonic()
    first = t.first_token or end
    return {
        "done": True,
        "done_reason": DONE_REASONS.get(finish_reason or "stop", "stop"),
        "total_duration": int((end - t.start) * NS),
        "load_duration": 0,
        "prompt_eval_count": gen.usage.prompt_tokens,
        "prompt_eval_duration": int((first - t.start) * NS),
        "eval_count": gen.usage.completion_tokens,
        "eval_duration": int((end - first) * NS),
    }


def ollama_logprobs(
    entries: list[TokenLogprobTuple], texts: TokenTexts, top: int
) -> list[dict[str, Any]]:
    out = []
    for token_id, logprob, alts in entries:
        token, raw = texts.get(token_id)
        item: dict[str, Any] = {"token": token, "logprob": logprob, "bytes": raw}
        if top:
            item["top_logprobs"] = [
                {"token": texts.get(t)[0], "logprob": lp, "bytes": texts.get(t)[1]}
                for t, lp in alts[:top]
            ]
        out.append(item)
    return out


def _message(parsed: Parsed) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.thinking:
        msg["thinking"] = parsed.thinking
    if parsed.tool_calls:
        msg["tool_calls"] = parsed.tool_calls
    return msg


def _generate_fields(parsed: Parsed) -> dict[str, Any]:
    fields: dict[str, Any] = {"response": parsed.content}
    if parsed.thinking:
        fields["thinking"] = parsed.thinking
    return fields


@dataclass
class Dialect:
    """How generate and chat differ: the body of a chunk and of the final object."""

    body: Callable[[Parsed], dict[str, Any]]
    final_extra: Callable[[Generation, Collected], dict[str, Any]]


def _generate_extra(gen: Generation, out: Collected) -> dict[str, Any]:
    """The legacy `context`: prompt and output ids, to send back as the next prompt's start.

    Output ids come from the detokenizer, which holds every token (events skip tokens
    whose text is not complete yet)."""
    choice = gen.choices.get(0)
    output = list(choice.detok.token_ids) if choice is not None else out.token_ids
    return {"context": list(gen.prepared.prompts[0]) + output}


GENERATE = Dialect(_generate_fields, _generate_extra)
CHAT = Dialect(lambda p: {"message": _message(p)}, lambda gen, out: {})


def _head(gen: Generation) -> dict[str, Any]:
    return {"model": ollama_name(gen.model.name), "created_at": now_iso()}


async def ndjson_stream(
    gen: Generation, shape: OllamaPrompt, dialect: Dialect
) -> AsyncIterator[bytes]:
    out = Collected()
    texts, top = gen.model.token_texts, shape.logprobs
    try:
        async for piece in pieces(gen, out):
            obj = {**_head(gen), **dialect.body(piece.parsed), "done": False}
            if top is not None and piece.logprobs:
                obj["logprobs"] = ollama_logprobs(piece.logprobs, texts, top)
            yield line(obj)
        final = {**_head(gen), **dialect.body(Parsed()), **final_fields(gen, out.finish_reason)}
        yield line({**final, **dialect.final_extra(gen, out)})
    except JobFailed as e:
        yield line({"error": f"generation failed: {e}"})


async def collect(gen: Generation, shape: OllamaPrompt, dialect: Dialect) -> dict[str, Any]:
    out = Collected()
    try:
        async for _ in pieces(gen, out):
            pass
    except JobFailed as e:
        raise internal_error(f"generation failed: {e}") from e
    obj = {**_head(gen), **dialect.body(out.parsed), **final_fields(gen, out.finish_reason)}
    if shape.logprobs is not None:
        obj["logprobs"] = ollama_logprobs(out.logprobs, gen.model.token_texts, shape.logprobs)
    return {**obj, **dialect.final_extra(gen, out)}


def load_response(model: str, chat: bool) -> dict[str, Any]:
    """An empty prompt loads the model (Ollama clients use it to warm up): nothing runs."""
    obj: dict[str, Any] = {"model": ollama_name(model), "created_at": now_iso()}
    obj.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    obj.update({"done": True, "done_reason": "load"})
    return obj
