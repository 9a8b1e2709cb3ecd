"""Tool calls out of model text, incrementally, for the template families jetserve serves.

- hermes (Qwen2.5, Qwen3): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
  any number, text allowed around them; each call is sent as soon as it closes.
- llama3_json (Llama 3.1/3.2/3.3): the whole answer is `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`, several separated by `;`).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (also `name[ARGS]{...}`);
  as `[TOOL_CALLS]` is a special token that detokenization may skip, an answer starting
  with `[{"name"` is read the same way.
- forced: `tool_choice` named (the text is the arguments object, streamed as it comes)
  or `required` (the text is a JSON array of {"name", "parameters"}), both produced
  under a grammar, so they always parse unless cut by max_tokens.

Each parser turns text into content pieces and complete or partial tool calls; the
non-streaming response is the concatenation of the same pieces, so a stream reassembles
exactly to the response.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from services.api.structured.reasoning import held_back

FAMILIES = ("hermes", "llama3_json", "mistral")
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG = "[TOOL_CALLS]"


def detect_family(chat_template: str | None) -> str | None:
    """Which call format a chat template teaches its model (None: no known format)."""
    t = chat_template or ""
    if HERMES_START in t:
        return "hermes"
    if MISTRAL_TAG in t:
        return "mistral"
    if PYTHON_TAG in t or "<|start_header_id|>" in t:
        return "llama3_json"
    return None


@dataclass
class CallPiece:
    """A tool call or a piece of one: `index` among the choice's calls; id/name on the first."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Parsed:
    content: str = ""
    calls: list[CallPiece] = field(default_factory=list)

    def extend(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.calls.extend(other.calls)
        return self


def call_id(scope: str, index: int) -> str:
    """Deterministic per (job, choice, call): a re-attached stream and GET /v1/jobs agree."""
    return "call_" + hashlib.sha256(f"{scope}:{index}".encode()).hexdigest()[:24]


def _arguments_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _call_from_obj(obj: Any, arg_keys: tuple[str, ...]) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in arg_keys:
        if key in obj:
            return obj["name"], _arguments_text(obj[key])
    return obj["name"], "{}"


def _json_sequence(text: str) -> list[Any] | None:
    """Objects written one after another, separated by whitespace, ';' or ','."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return out
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(obj)


@dataclass
class ToolParser:
    """Base: everything is content. Subclasses: feed(text) and finish() -> Parsed."""

    scope: str = ""
    num_calls: int = 0

    def _call(self, name: str, arguments: str) -> CallPiece:
        piece = CallPiece(self.num_calls, call_id(self.scope, self.num_calls), name, arguments)
        self.num_calls += 1
        return piece

    def feed(self, text: str) -> Parsed:
        return Parsed(content=text)

    def finish(self) -> Parsed:
        return Parsed()


@dataclass
class HermesParser(ToolParser):
    buf: str = ""
    in_call: bool = False

    def feed(self, text: str) -> Parsed:
        self.buf += text
        out = Parsed()
        while True:
            if not self.in_call:
                start = self.buf.find(HERMES_START)
                if start < 0:
                    keep = held_back(self.buf, HERMES_START)
                    cut = len(self.buf) - keep
                    out.content += self._content(self.buf[:cut])
                    self.buf = self.buf[cut:]
                    return out
                out.content += self._content(self.buf[:start])
                self.buf, self.in_call = self.buf[start + len(HERMES_START) :], True
            end = self.buf.find(HERMES_END)
            if end < 0:
                return out
            out.extend(self._close(self.buf[:end], closed=True))
            self.buf, self.in_call = self.buf[end + len(HERMES_END) :], False

    def _content(self, text: str) -> str:
        # Between and after calls a model writes newlines only: not content.
        return text if self.num_calls == 0 or text.strip() else ""

    def _close(self, body: str, closed: bool) -> Parsed:
        objs = _json_sequence(body)
        calls = [_call_from_obj(o, ("arguments", "parameters")) for o in objs or []]
        if not objs or any(c is None for c in calls):
            tail = HERMES_END if closed else ""
            return Parsed(content=HERMES_START + body + tail)
        return Parsed(calls=[self._call(name, args) for name, args in calls if name])

    def finish(self) -> Parsed:
        rest, self.buf = self.buf, ""
        if self.in_call:
            self.in_call = False
            return self._close(rest, closed=False)  # stopped by EOS before the closing tag
        return Parsed(content=self._content(rest))


@dataclass
class WholeAnswerParser(ToolParser):
    """llama3_json and mistral: the answer is either calls from its first character, or text."""

    family: str = "llama3_json"
    buf: str = ""
    mode: str = "undecided"  # "undecided" | "calls" | "content"

    @property
    def markers(self) -> tuple[str, ...]:
        return (PYTHON_TAG, "{") if self.family == "llama3_json" else (MISTRAL_TAG, '[{"name"')

    def feed(self, text: str) -> Parsed:
        if self.mode == "content":
            return Parsed(content=text)
        self.buf += text
        if self.mode == "undecided":
            head = self.buf.lstrip()
            if any(head.startswith(m) for m in self.markers):
                self.mode = "calls"
            elif not head or any(m.startswith(head) for m in self.markers):
                return Parsed()
            else:
                self.mode, rest, self.buf = "content", self.buf, ""
                return Parsed(content=rest)
        return Parsed()  # calls: parsed whole at the end

    def finish(self) -> Parsed:
        rest, self.buf = self.buf, ""
        if self.mode != "calls":
            return Parsed(content=rest)
        calls = self._parse(rest.strip())
        if calls is None:
            return Parsed(content=rest)
        return Parsed(calls=[self._call(name, args) for name, args in calls])

    def _parse(self, text: str) -> list[tuple[str, str]] | None:
        if self.family == "llama3_json":
            objs = _json_sequence(text.removeprefix(PYTHON_TAG))
            keys: tuple[str, ...] = ("parameters", "arguments")
        else:
            body = text.removeprefix(MISTRAL_TAG).strip()
            if not body.startswith("["):
                return _mistral_args_format(text)
            objs = _json_sequence(body)
            if objs is not None and len(objs) == 1 and isinstance(objs[0], list):
                objs = objs[0]
            keys = ("arguments", "parameters")
        if not objs:
            return None
        calls = [_call_from_obj(o, keys) for o in objs]
        return None if any(c is None for c in calls) else [c for c in calls if c]


def _mistral_args_format(text: str) -> list[tuple[str, str]] | None:
    """Mistral v11+: `[TOOL_CALLS]name[ARGS]{...}` repeated."""
    calls = []
    for part in text.split(MISTRAL_TAG):
        if not part.strip():
            continue
        name, sep, args = part.partition("[ARGS]")
        if not sep or _json_sequence(args.strip()) is None:
            return None
        calls.append((name.strip(), args.strip()))
    return calls or None


@dataclass
class NamedParser(ToolParser):
    """tool_choice naming a function: the text is its arguments, streamed as they come."""

    name: str = ""
    started: bool = False

    def feed(self, text: str) -> Parsed:
        if not self.started:
            self.started = True
            return Parsed(calls=[self._call(self.name, text)])
        return Parsed(calls=[CallPiece(0, arguments=text)]) if text else Parsed()

    def finish(self) -> Parsed:
        if not self.started:
            self.started = True
            return Parsed(calls=[self._call(self.name, "")])
        return Parsed()


@dataclass
class RequiredParser(ToolParser):
    """tool_choice "required": a JSON array of {"name", "parameters"} (grammar-enforced)."""

    buf: str = ""

    def feed(self, text: str) -> Parsed:
        self.buf += text
        return Parsed()

    def finish(self) -> Parsed:
        rest, self.buf = self.buf, ""
        try:
            objs = json.loads(rest)
        except ValueError:
            return Parsed(content=rest)  # cut short by max_tokens
        calls = [_call_from_obj(o, ("parameters",)) for o in objs if isinstance(objs, list)]
        if not calls or any(c is None for c in calls):
            return Parsed(content=rest)
        return Parsed(calls=[self._call(name, args) for name, args in calls if name])


def auto_parser(family: str, scope: str) -> ToolParser:
    if family == "hermes":
        return HermesParser(scope=scope)
    return WholeAnswerParser(scope=scope, family=family)
