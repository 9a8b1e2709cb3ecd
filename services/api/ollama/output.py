"""Generated text split into content, thinking and tool calls, as it streams.

Ollama returns a thinking model's `<think>...</think>` in `thinking` and a tool-calling
model's calls as `tool_calls` with arguments as JSON objects. Two call formats are
recognised: Hermes/Qwen tags (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`)
and an output that is one JSON object or array of calls (Llama 3.1 style, `parameters`
also accepted). Text that may be the start of a tag is held back until it is decided,
so the result does not depend on how the text was split into pieces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class Parsed:
    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.thinking or self.tool_calls)

    def extend(self, other: Parsed) -> None:
        self.content += other.content
        self.thinking += other.thinking
        self.tool_calls += other.tool_calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    name = fn.get("name")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return {"function": {"name": name, "arguments": args}}


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """One call or a JSON array of calls; None when `text` is not that."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call(x) for x in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


@dataclass
class OutputParser:
    """Per-completion state; `feed` returns what is decided, `finish` the rest."""

    think: bool = False
    tools: bool = False
    state: str = "content"  # content | thinking | tool | json
    held: str = ""
    tool_buf: str = ""
    started: bool = False  # non-whitespace content was emitted

    @classmethod
    def create(cls, think: bool, tools: bool, thinking_open: bool) -> OutputParser:
        state = "thinking" if think and thinking_open else "content"
        return cls(think=think, tools=tools, state=state)

    def feed(self, text: str) -> Parsed:
        if not self.think and not self.tools:
            return Parsed(content=text)  # plain text passes through untouched
        out = Parsed()
        buf, self.held = self.held + text, ""
        while buf:
            if self.state == "thinking":
                buf = self._thinking(buf, out)
            elif self.state == "tool":
                buf = self._tool(buf, out)
            elif self.state == "json":
                self.tool_buf += buf
                buf = ""
            else:
                buf = self._content(buf, out)
        return out

    def _thinking(self, buf: str, out: Parsed) -> str:
        idx = buf.find(THINK_CLOSE)
        if idx >= 0:
            out.thinking += buf[:idx]
            self.state = "content"
            return buf[idx + len(THINK_CLOSE) :].lstrip()
        keep = _partial_suffix(buf, THINK_CLOSE)
        out.thinking += buf[: len(buf) - keep]
        self.held = buf[len(buf) - keep :]
        return ""

    def _tool(self, buf: str, out: Parsed) -> str:
        idx = buf.find(TOOL_CLOSE)
        if idx < 0:
            keep = _partial_suffix(buf, TOOL_CLOSE)
            self.tool_buf += buf[: len(buf) - keep]
            self.held = buf[len(buf) - keep :]
            return ""
        body = (self.tool_buf + buf[:idx]).strip()
        self.tool_buf = ""
        self.state = "content"
        calls = parse_tool_calls(body)
        if calls is None:
            out.content += TOOL_OPEN + body + TOOL_CLOSE
            self.started = True
        else:
            out.tool_calls += calls
        return buf[idx + len(TOOL_CLOSE) :]

    def _content(self, buf: str, out: Parsed) -> str:
        if not self.started:
            stripped = buf.lstrip()
            if not stripped:
                self.held = buf
                return ""
            if self.think and THINK_OPEN.startswith(stripped[: len(THINK_OPEN)]):
                if len(stripped) < len(THINK_OPEN):
                    self.held = buf
                    return ""
                self.state = "thinking"
                return stripped[len(THINK_OPEN) :]
            if self.tools and stripped[0] in "{[":
                self.state, self.tool_buf = "json", stripped
                return ""
        if self.tools:
            idx = buf.find(TOOL_OPEN)
            if idx >= 0:
                self._emit(buf[:idx], out)
                self.state = "tool"
                return buf[idx + len(TOOL_OPEN) :]
            keep = _partial_suffix(buf, TOOL_OPEN)
            self._emit(buf[: len(buf) - keep], out)
            self.held = buf[len(buf) - keep :]
            return ""
        self._emit(buf, out)
        return ""

    def _emit(self, text: str, out: Parsed) -> None:
        if not self.started:
            text = text.lstrip() if self.think else text
        if text.strip():
            self.started = True
        out.content += text

    def finish(self) -> Parsed:
        """The output ended: decide everything still held back."""
        out = Parsed()
        held, self.held = self.held, ""
        if self.state == "thinking":
            out.thinking += held
        elif self.state == "content":
            out.content += held
        elif self.state == "tool":
            body = self.tool_buf + held
            calls = parse_tool_calls(body.strip())
            if calls is None:
                out.content += TOOL_OPEN + body
            else:
                out.tool_calls += calls
        elif self.state == "json":
            body = self.tool_buf + held
            calls = parse_tool_calls(body.strip())
            if calls is None:
                out.content += body
            else:
                out.tool_calls += calls
        self.state, self.tool_buf = "content", ""
        return out
