"""A chat choice's text -> content, reasoning_content and tool calls, incrementally.

The plan is decided once per request (from tools, tool_choice, the template family and
chat_template_kwargs) and travels with the prepared request, so a stream, a non-stream
response, a re-attached stream and the jobs API all split the same text the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.api.structured.reasoning import ReasoningSplitter
from services.api.structured.tool_parsers import (
    CallPiece,
    NamedParser,
    Parsed,
    RequiredParser,
    ToolParser,
    auto_parser,
)


@dataclass
class ChatOutputPlan:
    tool_mode: str | None = None  # None (no tools) | "none" | "auto" | "named" | "required"
    family: str | None = None  # for "auto"
    named: str | None = None  # for "named"
    reasoning: bool = False
    prompt_opens_think: bool = False
    parallel: bool = True  # parallel_tool_calls=false: only the first call is kept

    def parser(self, scope: str) -> ChatOutputParser:
        tools: ToolParser | None = None
        if self.tool_mode == "named":
            tools = NamedParser(scope=scope, name=self.named or "")
        elif self.tool_mode == "required":
            tools = RequiredParser(scope=scope)
        elif self.tool_mode == "auto" and self.family is not None:
            tools = auto_parser(self.family, scope)
        splitter = None
        if self.reasoning:
            splitter = ReasoningSplitter(
                mode="reasoning" if self.prompt_opens_think else "undecided"
            )
        return ChatOutputParser(splitter, tools, max_calls=None if self.parallel else 1)


@dataclass
class ChatPart:
    content: str = ""
    reasoning: str = ""
    calls: list[CallPiece] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)

    def extend(self, other: ChatPart) -> ChatPart:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls.extend(other.calls)
        return self


@dataclass
class ChatOutputParser:
    splitter: ReasoningSplitter | None
    tools: ToolParser | None
    max_calls: int | None = None

    @property
    def num_calls(self) -> int:
        return self.tools.num_calls if self.tools is not None else 0

    def feed(self, text: str) -> ChatPart:
        reasoning, content = self.splitter.feed(text) if self.splitter else ("", text)
        return self._content(reasoning, content, final=False)

    def finish(self) -> ChatPart:
        reasoning, content = self.splitter.finish() if self.splitter else ("", "")
        return self._content(reasoning, content, final=True)

    def _content(self, reasoning: str, content: str, final: bool) -> ChatPart:
        if self.tools is None:
            return ChatPart(content=content, reasoning=reasoning)
        parsed = self.tools.feed(content) if content else Parsed()
        if final:
            parsed.extend(self.tools.finish())
        calls = parsed.calls
        if self.max_calls is not None:
            calls = [c for c in calls if c.index < self.max_calls]
        return ChatPart(content=parsed.content, reasoning=reasoning, calls=calls)
