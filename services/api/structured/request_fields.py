"""Request fields -> the output constraint and the chat output plan, with 400s that name
the field: response_format, guided_* / structured_outputs, tools and tool_choice.

Field names follow OpenAI (`response_format`, `tools`, `tool_choice`,
`parallel_tool_calls`) and vLLM (`guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar`, and the newer `structured_outputs` object, `chat_template_kwargs`).
A request may set one constraint; anything jetserve does not enforce is refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.api.errors import bad_request
from services.api.openai.schemas import ChatCompletionRequest, SamplingFields
from services.api.structured.chat_output import ChatOutputPlan
from services.api.structured.reasoning import THINK_START
from services.api.structured.schema_subset import UnsupportedSchema, check_schema
from services.api.structured.tool_parsers import detect_family
from shared.structured_output import (
    GrammarUnavailable,
    StructuredOutput,
    build_grammar,
    choice_output,
    json_schema_output,
)
from shared.tokenizer import TokenizerBundle

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128
BACKENDS = (None, "auto", "xgrammar")
RESERVED_TEMPLATE_ARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception"}
)


def _schema_constraint(schema: Any, param: str) -> StructuredOutput:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise bad_request(f"{param} is not valid JSON: {e}", param=param) from e
    try:
        check_schema(schema)
    except UnsupportedSchema as e:
        raise bad_request(f"unsupported JSON schema in {param}: {e}", param=param) from e
    return json_schema_output(schema)


def _requested(req: SamplingFields) -> list[tuple[str, StructuredOutput]]:
    found: list[tuple[str, StructuredOutput]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", StructuredOutput("json_object")))
    elif rf is not None and rf.type == "json_schema":
        spec = rf.json_schema
        if spec is None or spec.schema_ is None:
            raise bad_request(
                "response_format json_schema needs json_schema.schema", param="response_format"
            )
        found.append(("response_format", _schema_constraint(spec.schema_, "response_format")))
    if req.guided_json is not None:
        found.append(("guided_json", _schema_constraint(req.guided_json, "guided_json")))
    if req.guided_regex is not None:
        found.append(("guided_regex", StructuredOutput("regex", req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", choice_output(req.guided_choice)))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutput("grammar", req.guided_grammar)))
    so = req.structured_outputs
    if so is not None:
        param = "structured_outputs"
        if so.json_ is not None:
            found.append((param, _schema_constraint(so.json_, "structured_outputs.json")))
        if so.regex is not None:
            found.append((param, StructuredOutput("regex", so.regex)))
        if so.choice is not None:
            found.append((param, choice_output(so.choice)))
        if so.grammar is not None:
            found.append((param, StructuredOutput("grammar", so.grammar)))
        if so.json_object:
            found.append((param, StructuredOutput("json_object")))
    return found


def checked(out: StructuredOutput, param: str) -> StructuredOutput:
    """Parse it as the engine will (no vocabulary needed): a bad spec is a 400 here."""
    try:
        build_grammar(out)
    except GrammarUnavailable as e:
        raise bad_request(str(e), param=param, code="structured_outputs_unavailable") from e
    except ValueError as e:
        raise bad_request(f"{param}: {e}", param=param) from e
    return out


def structured_output(req: SamplingFields) -> StructuredOutput | None:
    if req.guided_decoding_backend not in BACKENDS:
        raise bad_request(
            f"guided_decoding_backend {req.guided_decoding_backend!r} is not available; "
            "jetserve uses xgrammar",
            param="guided_decoding_backend",
        )
    if req.guided_whitespace_pattern is not None:
        raise bad_request(
            "guided_whitespace_pattern is not supported (JSON is written without "
            "optional whitespace)",
            param="guided_whitespace_pattern",
        )
    found = _requested(req)
    if len(found) > 1:
        names = ", ".join(dict.fromkeys(p for p, _ in found))
        raise bad_request(f"set at most one output constraint, got: {names}", param=found[1][0])
    if not found:
        return None
    param, out = found[0]
    return checked(out, param)


# -- tools ---------------------------------------------------------------------------------


def _forced_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """tool_choice "required": a JSON array of calls to the given functions (vLLM's shape)."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "parameters": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": options}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _tool_dicts(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    tools = req.tools or []
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if not FUNCTION_NAME.fullmatch(fn.name):
            raise bad_request(
                f"tools[{i}].function.name must match [A-Za-z0-9_-]{{1,64}}",
                param=f"tools[{i}].function.name",
            )
        if fn.name in seen:
            raise bad_request(f"tool name {fn.name!r} is defined twice", param="tools")
        seen.add(fn.name)
        d: dict[str, Any] = {"name": fn.name}
        if fn.description is not None:
            d["description"] = fn.description
        d["parameters"] = fn.parameters if fn.parameters is not None else {"type": "object"}
        out.append({"type": "function", "function": d})
    return out


def _check_parameters(tools: list[dict[str, Any]]) -> None:
    for i, tool in enumerate(tools):
        try:
            check_schema(tool["function"]["parameters"])
        except UnsupportedSchema as e:
            param = f"tools[{i}].function.parameters"
            raise bad_request(f"unsupported JSON schema in {param}: {e}", param=param) from e


def plan_tools(
    req: ChatCompletionRequest, tok: TokenizerBundle
) -> tuple[list[dict[str, Any]] | None, ChatOutputPlan, StructuredOutput | None]:
    """(tools for the template, the output plan, the constraint a forced call needs)."""
    if req.functions is not None or req.function_call is not None:
        raise bad_request(
            "functions/function_call are deprecated and not supported; use tools and tool_choice",
            param="functions" if req.functions is not None else "function_call",
        )
    plan = ChatOutputPlan()
    tools = _tool_dicts(req) if req.tools else None
    choice = req.tool_choice
    if tools is None:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None, plan, None
    template = tok.chat_template or ""
    if "tools" not in template:
        raise bad_request(
            "this model's chat template does not render tools, so it cannot be offered any",
            param="tools",
        )
    mode = "auto" if choice is None else choice if isinstance(choice, str) else "named"
    parallel = req.parallel_tool_calls is not False
    plan.tool_mode, plan.parallel = mode, parallel
    constraint = None
    if mode == "auto":
        plan.family = detect_family(template)
        if plan.family is None:
            raise bad_request(
                "tool_choice auto needs a chat template in a tool-call format jetserve can "
                "parse (hermes <tool_call>, llama3 JSON, mistral [TOOL_CALLS]); use "
                "tool_choice required or a named function instead",
                param="tool_choice",
            )
    elif mode == "named":
        assert not isinstance(choice, str) and choice is not None
        by_name = {t["function"]["name"]: t for t in tools}
        if choice.function.name not in by_name:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, which is not among the tools",
                param="tool_choice",
            )
        plan.named = choice.function.name
        chosen = [by_name[plan.named]]
        _check_parameters(chosen)
        constraint = json_schema_output(chosen[0]["function"]["parameters"])
    elif mode == "required":
        _check_parameters(tools)
        constraint = json_schema_output(_forced_schema(tools, parallel))
    if constraint is not None:
        constraint = checked(constraint, "tools")
    return tools, plan, constraint


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    kwargs = dict(req.chat_template_kwargs or {})
    bad = sorted(RESERVED_TEMPLATE_ARGS & kwargs.keys())
    if bad:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(bad)}", param="chat_template_kwargs"
        )
    return kwargs


def reasoning_enabled(tok: TokenizerBundle, kwargs: dict[str, Any]) -> bool:
    """Templates that teach <think> blocks get them split off, unless thinking is off."""
    return THINK_START in (tok.chat_template or "") and kwargs.get("enable_thinking") is not False
