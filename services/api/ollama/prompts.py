"""From an Ollama generate or chat request to the PreparedRequest every route queues.

The prompt is rendered here (the model's chat template with system, tools and think;
raw prompts; fill-in-the-middle for `suffix`; the legacy `context` ids), then the same
builder as the OpenAI routes (services/api/jobs/builder.py) validates the sampling and
the context length, so both dialects queue identical Jobs for identical requests.
Options the client leaves out take Ollama's defaults, overridden by the model's own
generation_config.json as an Ollama Modelfile would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from services.api.errors import APIError, bad_request
from services.api.jobs.builder import PreparedRequest, prepare_completion
from services.api.model_registry import ServedModel
from services.api.ollama.schemas import ChatRequest, GenerateRequest, Message, Options
from services.api.openai.schemas import MAX_LOGPROBS, CompletionRequest
from services.api.structured.chat_output import ChatOutputPlan
from services.api.structured.request_fields import checked
from services.api.structured.schema_subset import UnsupportedSchema, check_schema
from services.api.structured.tool_parsers import detect_family
from shared.structured_output import StructuredOutput, json_schema_output
from shared.tokenizer import client_strings

# Ollama's defaults when neither the request nor the model sets them.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
# generation_config.json key -> Options field
_MODEL_DEFAULTS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repeat_penalty",
}
# Fill-in-the-middle markers by tokenizer family: (prefix, suffix, middle).
FIM_TOKENS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
)
THINK_OPEN = "<think>"


@dataclass
class OllamaPrompt:
    """A prepared request plus what the response needs to know about its prompt."""

    prepared: PreparedRequest
    model: ServedModel  # with max_model_len capped by num_ctx
    logprobs: int | None


def output_plan(model: ServedModel, text: str, think: bool, tools: bool) -> ChatOutputPlan | None:
    """How the Generation splits the output: `<think>` blocks into thinking, tool calls
    in the template's format (Hermes tags when it names none) into tool_calls."""
    if not think and not tools:
        return None
    family = (detect_family(model.tokenizer.chat_template) or "hermes") if tools else None
    return ChatOutputPlan(
        tool_mode="auto" if tools else None,
        family=family,
        reasoning=think,
        prompt_opens_think=text.rstrip().endswith(THINK_OPEN),
    )


def not_supported(model: str, what: str) -> APIError:
    return bad_request(f'"{model}" does not support {what}')


def fim_tokens(model: ServedModel) -> tuple[str, str, str] | None:
    tok = model.tokenizer.tokenizer
    for triple in FIM_TOKENS:
        if all(tok.token_to_id(t) is not None for t in triple):
            return triple
    return None


def capabilities(model: ServedModel) -> list[str]:
    """What /api/show reports and the routes check: Ollama's capability names."""
    template = model.tokenizer.chat_template or ""
    caps = ["completion", "embedding"]
    if "tools" in template:
        caps.append("tools")
    if fim_tokens(model) is not None:
        caps.append("insert")
    if THINK_OPEN in template or "enable_thinking" in template:
        caps.append("thinking")
    return caps


def effective_options(model: ServedModel, options: Options | None) -> Options:
    """The request's options over the model's generation_config over Ollama's defaults."""
    values: dict[str, Any] = dict(DEFAULTS)
    gen = model.tokenizer.generation_config
    for key, field_name in _MODEL_DEFAULTS.items():
        value = gen.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            values[field_name] = int(value) if field_name == "top_k" else float(value)
    if options is not None:
        values.update(options.model_dump(exclude_none=True))
    return Options.model_validate(values, strict=False)


def _num_predict(value: int | None) -> int | None:
    if value is None or value in (-1, -2):  # until the end of text / fill the context
        return None
    if value < 1:
        raise bad_request(
            f"num_predict must be positive, -1 or -2, got {value}", param="num_predict"
        )
    return value


def capped_model(model: ServedModel, num_ctx: int | None) -> ServedModel:
    if num_ctx is None:
        return model
    if num_ctx < 1:
        raise bad_request(f"num_ctx must be positive, got {num_ctx}", param="num_ctx")
    limit = min(model.max_model_len or num_ctx, num_ctx)
    return dataclasses.replace(model, max_model_len=limit)


def _logprobs(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_LOGPROBS:
        raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}")
    if not logprobs:
        return None
    return top_logprobs or 0


def prepare(
    model: ServedModel,
    ids: list[int],
    options: Options | None,
    logprobs: int | None,
    structured: StructuredOutput | None = None,
) -> tuple[PreparedRequest, ServedModel]:
    """Sampling and context checks through the OpenAI routes' builder."""
    o = effective_options(model, options)
    capped = capped_model(model, o.num_ctx)
    req = CompletionRequest(
        model=model.name,
        prompt=ids,
        max_tokens=_num_predict(o.num_predict),
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        seed=o.seed,
        stop=o.stop,
        repetition_penalty=o.repeat_penalty,
        presence_penalty=o.presence_penalty or 0.0,
        frequency_penalty=o.frequency_penalty or 0.0,
        logprobs=logprobs,
    )
    prepared = prepare_completion(req, capped)
    if structured is not None:
        sampling = dataclasses.replace(prepared.sampling, structured=structured)
        prepared = dataclasses.replace(prepared, sampling=sampling)
    return prepared, capped


def structured_format(value: Any) -> StructuredOutput | None:
    """`format`: "json" (any JSON object) or a JSON schema, through constrained decoding.

    Checked as for the OpenAI routes' response_format (the schema subset the grammar
    enforces, the grammar built once), so a bad schema is a 400 before anything is queued.
    """
    if value in (None, ""):
        return None
    if value == "json":
        return checked(StructuredOutput("json_object"), "format")
    if not isinstance(value, dict):
        raise bad_request('format must be "json" or a JSON schema object', param="format")
    try:
        check_schema(value)
    except UnsupportedSchema as e:
        raise bad_request(f"unsupported JSON schema in format: {e}", param="format") from e
    return checked(json_schema_output(value), "format")


def _check_think(model: ServedModel, think: bool | str | None) -> bool:
    if think is None or think is False:
        return False
    if isinstance(think, str) and think not in ("low", "medium", "high"):
        raise bad_request(f"think must be true, false, 'low', 'medium' or 'high', got {think!r}")
    if "thinking" not in capabilities(model):
        raise not_supported(model.name, "thinking")
    return True


def _encode_template(model: ServedModel, messages: list[dict[str, Any]], **ctx: Any) -> str:
    try:
        return model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **ctx)
    except ValueError as e:
        raise bad_request(str(e)) from e
    except Exception as e:  # jinja2 errors, raise_exception() in templates
        raise bad_request(f"chat template failed: {e}") from e


def _template_context(think: bool, think_value: bool | str | None) -> dict[str, Any]:
    return {} if think_value is None else {"enable_thinking": think}


def generate_prompt(req: GenerateRequest, model: ServedModel) -> OllamaPrompt:
    """The prompt ids of /api/generate: raw, templated, or fill-in-the-middle."""
    structured = structured_format(req.format)
    if req.images:
        raise not_supported(model.name, "images")
    if req.template:
        raise bad_request("template overrides are not supported; the model's own is used")
    think = _check_think(model, req.think)
    tok = model.tokenizer
    prompt = req.prompt or ""
    text = prompt
    special = True
    contents: list[str] | None = None  # templated: what the client typed
    if req.suffix:
        fim = fim_tokens(model)
        if fim is None:
            raise not_supported(model.name, "insert")
        text = f"{fim[0]}{prompt}{fim[1]}{req.suffix}{fim[2]}"
        special = False
    elif not req.raw and tok.chat_template:
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": prompt})
        text = _encode_template(model, messages, **_template_context(think, req.think))
        special = False
        contents = client_strings(messages)
    if contents is None:  # raw or fill-in-the-middle: the client writes the control tokens
        ids = list(req.context or []) + tok.encode(text, add_special_tokens=special)
    else:
        try:
            ids = list(req.context or []) + tok.encode_rendered(text, contents)
        except ValueError as e:
            raise bad_request(str(e)) from e
    logprobs = _logprobs(req.logprobs, req.top_logprobs)
    prepared, capped = prepare(model, ids, req.options, logprobs, structured)
    prepared.output_plan = output_plan(model, text, think, tools=False)
    return OllamaPrompt(prepared, capped, logprobs)


def template_messages(messages: list[Message], model: ServedModel) -> list[dict[str, Any]]:
    """Ollama messages as chat templates expect them (HF conventions for tool calls)."""
    out = []
    for m in messages:
        if m.images:
            raise not_supported(model.name, "images")
        d: dict[str, Any] = dict(m.model_extra or {})
        d["role"] = m.role
        d["content"] = m.content or ""
        if m.thinking:
            d["reasoning_content"] = m.thinking
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in m.tool_calls
            ]
        if m.tool_name:
            d["name"] = m.tool_name
            d["tool_name"] = m.tool_name
        out.append(d)
    return out


def chat_prompt(req: ChatRequest, model: ServedModel) -> OllamaPrompt:
    """The prompt ids of /api/chat: the chat template over messages, tools and think."""
    structured = structured_format(req.format)
    think = _check_think(model, req.think)
    if not model.tokenizer.chat_template:
        raise bad_request(f'"{model.name}" has no chat template; use /api/generate with raw')
    ctx = _template_context(think, req.think)
    if req.tools:
        if "tools" not in capabilities(model):
            raise not_supported(model.name, "tools")
        ctx["tools"] = [t.model_dump() for t in req.tools]
    messages = template_messages(req.messages or [], model)
    text = _encode_template(model, messages, **ctx)
    try:  # control tokens come from the template only, never from messages or tools
        ids = model.tokenizer.encode_rendered(text, client_strings(messages, ctx))
    except ValueError as e:
        raise bad_request(str(e)) from e
    if not ids:
        raise bad_request("the rendered chat prompt is empty")
    logprobs = _logprobs(req.logprobs, req.top_logprobs)
    prepared, capped = prepare(model, ids, req.options, logprobs, structured)
    prepared.output_plan = output_plan(model, text, think, bool(req.tools))
    return OllamaPrompt(prepared, capped, logprobs)
