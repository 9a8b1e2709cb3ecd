"""What the OpenAI-compatible endpoints do with each request field: the one declaration
docs/openai.md's tables are generated from.

Every field of each request model has a row: `supported` (it does what OpenAI or vLLM
says, within the limits noted), `ignored` (accepted so clients that always send it keep
working, with no effect) or `rejected` (a 400 naming the field when it asks for what
jetserve does not do; `example` is such a value, which tests send). Fields a request
model does not declare are ignored, so newer SDKs keep working; none that changes what a
client gets back is left undeclared. Tests check that the rows match the models' fields
and that every rejected example gets its 400 from a running API.

    python -m services.api.openai.field_support                          # print them
    python -m services.api.openai.field_support --write docs/openai.md   # update the page
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from services.api.embeddings.openai_route import EmbeddingRequest
from services.api.jobs.builder import MAX_STOP_STRINGS
from services.api.openai.schemas import (
    MAX_LOGPROBS,
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
)
from services.api.structured.request_fields import MAX_TOOLS

Status = Literal["supported", "ignored", "rejected"]


@dataclass(frozen=True)
class Support:
    status: Status
    note: str
    example: Any = None  # rejected only: a value that gets the 400


def ok(note: str) -> Support:
    return Support("supported", note)


def ignored(note: str) -> Support:
    return Support("ignored", note)


def rejected(note: str, example: Any) -> Support:
    return Support("rejected", note, example)


STRUCTURED = "needs the `structured` extra (xgrammar); without it a 400"
SAMPLING: dict[str, Support] = {
    "model": ok("a served model's name (`GET /v1/models`); unknown: 404 `model_not_found`"),
    "max_tokens": ok(
        "default: what the context leaves after the prompt; more than that: 400 "
        "`context_length_exceeded`"
    ),
    "temperature": ok("0 to 2; 0 is greedy; default 1"),
    "top_p": ok("(0, 1]"),
    "n": ok(f"1 to {MAX_N} choices per prompt"),
    "stream": ok("server-sent events, ending in `data: [DONE]`"),
    "stream_options": ok("`include_usage`: a last chunk with usage; other keys ignored"),
    "stop": ok(f"a string or up to {MAX_STOP_STRINGS} non-empty strings; not in the output"),
    "seed": ok("0 to 2^63-1; same seed, same tokens (on the same worker build)"),
    "presence_penalty": ok("-2 to 2"),
    "frequency_penalty": ok("-2 to 2"),
    "logit_bias": rejected("not implemented; an empty object is accepted", {"50256": -100}),
    "user": ok("kept as the usage record's tag (gateway metering); not shown to the model"),
    "top_k": ok("extension: -1 or 0 off, else the k most likely tokens"),
    "min_p": ok("extension: 0 to 1"),
    "repetition_penalty": ok("extension: > 0, 1 is off"),
    "ignore_eos": ok("extension: generate max_tokens even past end-of-sequence"),
    "speculative_decoding": ok(
        "extension: false opts this request out of the worker's speculative decoding "
        "(`--speculative-method`); the tokens are the same either way, only the cost differs"
    ),
    "stop_token_ids": ok("extension: token ids that end the choice"),
    "skip_special_tokens": ok("extension: default true"),
    "priority": ok("extension: lower runs first inside the key's priority class"),
    "response_format": ok(f"`text`, `json_object`, `json_schema`; {STRUCTURED}"),
    "guided_json": ok(f"vLLM's: a JSON schema (object or text); {STRUCTURED}"),
    "guided_regex": ok(f"vLLM's; {STRUCTURED}"),
    "guided_choice": ok(f"vLLM's: one of these strings; {STRUCTURED}"),
    "guided_grammar": ok(f"vLLM's: an EBNF grammar; {STRUCTURED}"),
    "guided_decoding_backend": rejected(
        "`auto` or `xgrammar` accepted; any other backend is a 400", "outlines"
    ),
    "guided_whitespace_pattern": rejected(
        "JSON comes in one fixed layout: ', ' and ': ', no other whitespace", r"\s*"
    ),
    "structured_outputs": ok(
        f"vLLM's newer object: exactly one of json, regex, choice, grammar, json_object; "
        f"{STRUCTURED}"
    ),
}

COMPLETIONS: dict[str, Support] = {
    **SAMPLING,
    "prompt": ok("a string, strings, token ids, or lists of token ids (one choice set each)"),
    "logprobs": ok(f"0 to {MAX_LOGPROBS} alternatives per token"),
    "echo": rejected("the prompt is not repeated in the output", True),
    "best_of": rejected("accepted only equal to n", 4),
    "suffix": rejected("no fill-in-the-middle", "}"),
}

CHAT: dict[str, Support] = {
    **SAMPLING,
    "messages": ok(
        "system, developer, user, assistant, tool roles; text or text parts; rendered by "
        "the model's own chat template (a model without one: 400)"
    ),
    "max_completion_tokens": ok("as max_tokens; wins over it"),
    "logprobs": ok("true: the chosen token's logprob"),
    "top_logprobs": ok(f"0 to {MAX_LOGPROBS}; needs logprobs true"),
    "add_generation_prompt": ok("vLLM's; default true"),
    "tools": ok(
        f"up to {MAX_TOOLS} functions, rendered by the chat template (a template without "
        "tools: 400)"
    ),
    "tool_choice": ok(
        "none, auto (templates in hermes, llama3 or mistral format), required, or a named "
        f"function (required and named force the call; {STRUCTURED})"
    ),
    "parallel_tool_calls": ok("false: at most one call"),
    "chat_template_kwargs": ok("extra variables for the template (e.g. enable_thinking)"),
    "functions": rejected("deprecated by OpenAI; use tools", [{"name": "f"}]),
    "function_call": rejected("deprecated by OpenAI; use tool_choice", "auto"),
    "audio": rejected("no audio output", {"voice": "alloy", "format": "wav"}),
    "modalities": rejected('only ["text"] is accepted', ["text", "audio"]),
    "web_search_options": rejected("no web search", {}),
    "reasoning_effort": ignored(
        "reasoning is the chat template's (chat_template_kwargs, e.g. enable_thinking)"
    ),
    "verbosity": ignored("no effect"),
    "prediction": ignored("predicted outputs only speed OpenAI up; the answer is the same"),
    "store": ignored("nothing is stored for OpenAI's dashboard"),
    "metadata": ignored("goes with store"),
    "service_tier": ignored("the key's priority class decides (docs/gateway.md)"),
    "prompt_cache_key": ignored("prefix caching is automatic"),
    "safety_identifier": ignored("use user for the usage tag"),
}

EMBEDDINGS: dict[str, Support] = {
    "model": ok("a served model's name: its decoder's final hidden state is the embedding"),
    "input": ok("a string, strings, token ids, or lists of token ids"),
    "encoding_format": ok("float or base64 (little-endian float32)"),
    "dimensions": ok("keep the first N values (renormalized when normalize is on)"),
    "user": ok("kept as the usage record's tag"),
    "pooling": ok("extension: last (default) or mean"),
    "normalize": ok("extension: default true (unit length)"),
    "truncate": ok("extension: cut inputs longer than the context instead of a 400"),
}


@dataclass(frozen=True)
class Endpoint:
    title: str
    model: type[BaseModel]
    fields: dict[str, Support]
    path: str


ENDPOINTS = (
    Endpoint("POST /v1/completions", CompletionRequest, COMPLETIONS, "/v1/completions"),
    Endpoint("POST /v1/chat/completions", ChatCompletionRequest, CHAT, "/v1/chat/completions"),
    Endpoint("POST /v1/embeddings", EmbeddingRequest, EMBEDDINGS, "/v1/embeddings"),
)


def request_fields(model: type[BaseModel]) -> list[str]:
    """The names clients send (aliases where a field has one)."""
    return [f.alias or name for name, f in model.model_fields.items()]


def table(endpoint: Endpoint) -> str:
    rows = ["| field | status | notes |", "|---|---|---|"]
    for name in request_fields(endpoint.model):
        f = endpoint.fields[name]
        note = f.note.replace("|", "\\|")
        rows.append(f"| `{name}` | {f.status} | {note} |")
    return "\n".join(rows)


def markdown() -> str:
    """Every endpoint's table, under a heading each (what docs/openai.md embeds)."""
    return "\n\n".join(f"### {e.title}\n\n{table(e)}" for e in ENDPOINTS) + "\n"


BEGIN = "<!-- field tables: generated, do not edit -->\n"
END = "<!-- end of field tables -->"


def embedded(page: str) -> str:
    """The generated part of a page (between the markers)."""
    start = page.index(BEGIN) + len(BEGIN)
    return page[start : page.index(END, start)]


def rewrite(path: Path) -> None:
    page = path.read_text()
    path.write_text(page.replace(embedded(page), markdown(), 1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        rewrite(Path(sys.argv[2]))
    else:
        print(markdown(), end="")
