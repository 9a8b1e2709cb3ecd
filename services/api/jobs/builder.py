"""From a validated OpenAI request to what a Job carries: prompt token ids and sampling.

All semantic checks that the schema cannot express live here (ranges, the model's
context limit, unsupported options), each raising a 400 that names the parameter, so a
bad request never reaches a worker.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from services.api.errors import bad_request
from services.api.model_registry import ServedModel
from services.api.openai.schemas import (
    MAX_LOGPROBS,
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from services.api.structured.chat_output import ChatOutputPlan
from services.api.structured.request_fields import (
    plan_tools,
    reasoning_enabled,
    structured_output,
    template_kwargs,
)
from shared.messages import SamplingParams
from shared.tokenizer import client_strings

MAX_STOP_STRINGS = 16
# Each prompt is a job the API follows (server-side state on NATS) and a share of the
# key's open-stream budget; vLLM sets no bound, OpenAI's legacy completions took lists.
MAX_PROMPTS = 32
DEFAULT_MAX_TOKENS_NO_LIMIT = 256  # when neither the worker nor the tokenizer knows the limit
SEED_LIMIT = 2**63
INT32_LIMIT = 2**31  # ids and counts travel as fixed-size ints (msgpack, torch)


@dataclass
class PreparedRequest:
    """Everything the generation step needs, independent of the endpoint."""

    prompts: list[list[int]]
    sampling: SamplingParams
    stop: list[str]
    skip_special_tokens: bool
    priority: int
    max_tokens_explicit: bool
    output_plan: ChatOutputPlan | None = None  # chat: tool calls and reasoning to split off


def _check_range(value: float | None, name: str, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"{name} must be between {lo} and {hi}, got {value}", param=name)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", param="stop")
    return stops


def resolve_max_tokens(
    requested: int | None, longest_prompt: int, max_model_len: int | None, param: str
) -> int:
    """Default: whatever context is left. Explicit: must fit in the context."""
    if requested is not None and requested < 1:
        raise bad_request(f"{param} must be at least 1, got {requested}", param=param)
    if max_model_len is None:
        return requested or DEFAULT_MAX_TOKENS_NO_LIMIT
    room = max_model_len - longest_prompt
    if room < 1:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {longest_prompt} tokens, leaving no room for completion tokens.",
            param="messages" if param == "max_completion_tokens" else "prompt",
            code="context_length_exceeded",
        )
    if requested is None:
        return room
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {longest_prompt + requested} tokens ({longest_prompt} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def _sampling(req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {n}", param="n")
    _check_range(req.temperature, "temperature", 0.0, 2.0)
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
    _check_range(req.presence_penalty, "presence_penalty", -2.0, 2.0)
    _check_range(req.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    _check_range(req.min_p, "min_p", 0.0, 1.0)
    if req.top_k is not None and not -1 <= req.top_k < INT32_LIMIT:
        raise bad_request("top_k must be -1, 0 (disabled) or positive", param="top_k")
    if req.repetition_penalty is not None and not 0 < req.repetition_penalty < math.inf:
        raise bad_request("repetition_penalty must be > 0 and finite", param="repetition_penalty")
    if req.seed is not None and not 0 <= req.seed < SEED_LIMIT:
        raise bad_request(f"seed must be in [0, 2**63), got {req.seed}", param="seed")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias")
    stop_ids = list(req.stop_token_ids or [])
    if any(not 0 <= t < INT32_LIMIT for t in stop_ids):
        raise bad_request("stop_token_ids must be non-negative token ids", param="stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logprobs=logprobs,
        stop_token_ids=stop_ids,
        ignore_eos=bool(req.ignore_eos),
        n=n,
        speculative=req.speculative_decoding is not False,
        structured=structured_output(req),
    )


def _check_token_ids(ids: list[int], vocab_size: int) -> None:
    if not ids:
        raise bad_request("prompt must not be empty", param="prompt")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"prompt token id {bad} is outside the vocabulary", param="prompt")


# Text normalizers can drop characters (so fewer tokens than the vocabulary bound): leave
# room for that before refusing a text untokenized.
TOKEN_BYTES_MARGIN = 2


def prompt_byte_limit(model: ServedModel) -> int | None:
    """Bytes of text beyond which a prompt cannot fit in the model's context."""
    if model.max_model_len is None:
        return None
    return model.max_model_len * model.tokenizer.max_token_bytes * TOKEN_BYTES_MARGIN


def request_texts(req: CompletionRequest | ChatCompletionRequest) -> list[str]:
    if isinstance(req, ChatCompletionRequest):
        return ["".join(m.text() or "" for m in req.messages)]
    p = req.prompt
    if isinstance(p, str):
        return [p]
    return [s for s in p or [] if isinstance(s, str)]


def check_request_size(req: CompletionRequest | ChatCompletionRequest, model: ServedModel) -> None:
    """Refuse, before any tokenizing, prompts too many or too long to possibly fit: an
    8 MiB prompt is a 400 in microseconds, not seconds of tokenizer time."""
    p = getattr(req, "prompt", None)
    if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    check_texts_fit(request_texts(req), model, param)


def check_texts_fit(texts: list[str], model: ServedModel, param: str) -> None:
    """400 for a text that cannot fit in the model's context, judged by its byte size."""
    limit = prompt_byte_limit(model)
    if limit is None:
        return
    for text in texts:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise bad_request(
                f"This model's maximum context length is {model.max_model_len} tokens; a "
                f"prompt of {size} bytes cannot fit in it.",
                param=param,
                code="context_length_exceeded",
            )


def completion_prompts(req: CompletionRequest, model: ServedModel) -> list[list[int]]:
    """`prompt` may be a string, a list of strings, token ids, or a list of token id lists."""
    p = req.prompt
    tok = model.tokenizer
    if isinstance(p, str):
        prompts = [tok.encode(p)]
    elif not p:
        raise bad_request("prompt must not be empty", param="prompt")
    elif isinstance(p[0], str):
        prompts = [tok.encode(s) for s in p]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(ids) for ids in p]
    for ids in prompts:
        _check_token_ids(ids, tok.vocab_size)
    return prompts


def prepare_completion(req: CompletionRequest, model: ServedModel) -> PreparedRequest:
    if req.echo:
        raise bad_request("echo is not supported", param="echo")
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of other than n is not supported", param="best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
    check_request_size(req, model)
    prompts = completion_prompts(req, model)
    longest = max(len(p) for p in prompts)
    max_tokens = resolve_max_tokens(req.max_tokens, longest, model.max_model_len, "max_tokens")
    return PreparedRequest(
        prompts=prompts,
        sampling=_sampling(req, max_tokens, req.logprobs),
        stop=stop_strings(req.stop),
        skip_special_tokens=req.skip_special_tokens is not False,
        priority=req.priority or 0,
        max_tokens_explicit=req.max_tokens is not None,
    )


def _template_tool_calls(calls: Any, where: str) -> list[Any]:
    """Assistant tool_calls as templates expect them: arguments as an object, not text
    (transformers' templates write `arguments | tojson`), as vLLM hands them over."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be an array", param="messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where}.tool_calls entries need function.name", param="messages")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                pass  # a template can still print the text
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    if not req.messages:
        raise bad_request("messages must contain at least one message", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        d = dict(m.model_extra or {})
        d["role"] = m.role
        d["content"] = m.text()
        if m.role == "assistant" and d.get("tool_calls") is not None:
            d["tool_calls"] = _template_tool_calls(d["tool_calls"], f"messages[{i}]")
        out.append(d)
    return out


def chat_prompt(
    req: ChatCompletionRequest,
    model: ServedModel,
    tools: list[dict[str, Any]] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], str]:
    """The prompt's token ids and its text (a template may open a think block at its end)."""
    messages = chat_messages(req)
    tok = model.tokenizer
    try:
        text = tok.apply_chat_template(
            messages,
            add_generation_prompt=req.add_generation_prompt is not False,
            tools=tools,
            **(kwargs or {}),
        )
    except ValueError as e:  # no template
        raise bad_request(str(e), param="messages") from e
    except Exception as e:  # jinja2 errors, raise_exception() in templates
        raise bad_request(f"chat template failed: {e}", param="messages") from e
    try:
        # Control tokens come from the template only, never from what the client wrote:
        # messages, tool definitions, template kwargs.
        ids = tok.encode_rendered(text, client_strings(messages, tools, kwargs))
    except ValueError as e:
        raise bad_request(str(e), param="messages") from e
    if not ids:
        raise bad_request("the rendered chat prompt is empty", param="messages")
    return ids, text


def _refuse_other_outputs(req: ChatCompletionRequest) -> None:
    """Audio and web search change what a client gets back: refuse, never drop them."""
    if req.audio is not None:
        raise bad_request("audio output is not supported", param="audio")
    if req.modalities is not None and req.modalities != ["text"]:
        raise bad_request('modalities: only ["text"] is supported', param="modalities")
    if req.web_search_options is not None:
        raise bad_request("web search is not supported", param="web_search_options")


def prepare_chat(req: ChatCompletionRequest, model: ServedModel) -> PreparedRequest:
    _refuse_other_outputs(req)
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be between 0 and {MAX_LOGPROBS}", param="top_logprobs"
            )
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    check_request_size(req, model)
    tools, plan, forced = plan_tools(req, model.tokenizer)
    kwargs = template_kwargs(req)
    prompt, prompt_text = chat_prompt(req, model, tools, kwargs)
    requested = req.max_completion_tokens
    param = "max_completion_tokens"
    if requested is None:
        requested, param = req.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(requested, len(prompt), model.max_model_len, param)
    sampling = _sampling(req, max_tokens, logprobs)
    if forced is not None:
        if sampling.structured is not None:
            raise bad_request(
                "a forced tool call (tool_choice required or named) cannot be combined with "
                "another output constraint",
                param="tool_choice",
            )
        sampling = replace(sampling, structured=forced)
    # A JSON or choice constraint applies from the first token, so there is no think block
    # to split; a regex or grammar the client wrote may include one.
    json_like = sampling.structured is not None and sampling.structured.kind not in (
        "regex",
        "grammar",
    )
    if not json_like and reasoning_enabled(model.tokenizer, kwargs):
        plan.reasoning = True
        plan.prompt_opens_think = prompt_text.rstrip().endswith("<think>")
    return PreparedRequest(
        prompts=[prompt],
        sampling=sampling,
        stop=stop_strings(req.stop),
        skip_special_tokens=req.skip_special_tokens is not False,
        priority=req.priority or 0,
        max_tokens_explicit=requested is not None,
        output_plan=plan,
    )
