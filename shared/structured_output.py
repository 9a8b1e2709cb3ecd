"""A request's output constraint: what kind of grammar, in one canonical text form.

The API builds it from `response_format`, the `guided_*` fields or a forced tool call;
it travels inside SamplingParams (so inside the Job), and the engine compiles it into
a token-level grammar. The canonical text (a JSON schema dumped with sorted keys, a
regex, a JSON list of choices, an EBNF grammar) is also the grammar cache's key, so
two requests with the same schema written in a different key order share one compile.

xgrammar is imported lazily: without it every unconstrained request still works and a
constrained one fails with `GrammarUnavailable`, which the API turns into a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 64 * 1024
# JSON without optional whitespace: fewer tokens, and a small model cannot wander off
# into endless blank space between keys (vLLM's `disable-any-whitespace`).
ANY_WHITESPACE = False
INSTALL_HINT = "structured outputs need the xgrammar package (pip install 'jetserve[structured]')"


class GrammarUnavailable(RuntimeError):
    """xgrammar is not installed where the grammar was needed."""


@dataclass(frozen=True)
class StructuredOutput:
    """`kind` is one of KINDS; `spec` its canonical text ("" for json_object)."""

    kind: str
    spec: str = ""

    @property
    def cache_key(self) -> tuple[str, str]:
        return (self.kind, self.spec)

    def validate(self) -> None:
        """Raise ValueError on a malformed constraint (shape only; `build_grammar` parses)."""
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError("structured output spec must be a string")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"structured output spec is over {MAX_SPEC_CHARS} characters")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"structured output {self.kind} needs a non-empty spec")


def canonical_json(value: Any) -> str:
    """Compact, key order kept: a schema's property order is the order the JSON is written in."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_schema_output(schema: dict[str, Any]) -> StructuredOutput:
    return StructuredOutput("json_schema", canonical_json(schema))


def choice_output(choices: list[str]) -> StructuredOutput:
    return StructuredOutput("choice", canonical_json(list(choices)))


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise GrammarUnavailable(INSTALL_HINT) from e
    return xgrammar


def grammar_available() -> bool:
    try:
        _xgrammar()
    except GrammarUnavailable:
        return False
    return True


def _choice_ebnf(choices: list[str]) -> str:
    alternatives = " | ".join(json.dumps(c) for c in choices)  # EBNF strings use JSON escapes
    return f"root ::= {alternatives}"


def build_grammar(out: StructuredOutput) -> Any:
    """The xgrammar Grammar (no vocabulary needed); ValueError names what is wrong.

    The API calls this to reject a bad schema with a 400 before anything is queued;
    the engine compiles the same Grammar against its vocabulary.
    """
    xgr = _xgrammar()
    out.validate()
    try:
        if out.kind in ("json_object", "json_schema"):
            # json_object: any JSON object, written compactly like a schema's output.
            schema = out.spec if out.kind == "json_schema" else '{"type":"object"}'
            grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=ANY_WHITESPACE)
            return _without_raw_control_chars(xgr, grammar)
        if out.kind == "regex":
            return xgr.Grammar.from_regex(out.spec)
        if out.kind == "choice":
            choices = json.loads(out.spec)
            if not isinstance(choices, list) or not choices:
                raise ValueError("a choice constraint needs a non-empty list of strings")
            if not all(isinstance(c, str) and c for c in choices):
                raise ValueError("every choice must be a non-empty string")
            return xgr.Grammar.from_ebnf(_choice_ebnf(choices))
        return xgr.Grammar.from_ebnf(out.spec)
    except ValueError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError / its own errors on bad input
        raise ValueError(f"invalid {out.kind}: {_first_line(e)}") from e


# xgrammar (0.2.x) writes JSON string characters as [^"\\\r\n] (length-bounded
# strings) or [^\0-\x1f"\\\r\n]: the first admits raw control characters, which JSON
# forbids inside strings, and both admit UTF-8-encoded surrogates (ED A0..BF xx), which
# are not valid UTF-8 and decode to U+FFFD, one per byte, breaking maxLength. Both are
# rewritten to the JSON string character class.
_LOOSE_STRING_CHARS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\uD800-\uDFFF]"


def _without_raw_control_chars(xgr: Any, grammar: Any) -> Any:
    text = str(grammar)
    if not any(loose in text for loose in _LOOSE_STRING_CHARS):
        return grammar
    for loose in _LOOSE_STRING_CHARS:
        text = text.replace(loose, _JSON_STRING_CHAR)
    return xgr.Grammar.from_ebnf(text)


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# -- the wire form (inside the Job's sampling map) ----------------------------------------


def to_wire(out: StructuredOutput | None) -> dict[str, str] | None:
    return None if out is None else {"kind": out.kind, "spec": out.spec}


def from_wire(value: Any) -> StructuredOutput | None:
    """ValueError on anything malformed (the message decoder wraps it)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("structured must be a map")
    kind, spec = value.get("kind"), value.get("spec", "")
    if not isinstance(kind, str) or not isinstance(spec, str):
        raise ValueError("structured.kind and structured.spec must be strings")
    out = StructuredOutput(kind, spec)
    out.validate()
    return out
