"""Tool calling through the real stack for each template family jetserve serves.

One worker per family (tiny random checkpoints whose chat templates are written in that
family's real format), one API, the openai client. A random model does not call tools on
its own, so the `auto` round trips make it answer in the family's call format with a
literal grammar: the parser then reads real tokens of that format. `required` and named
tool_choice are enforced by the engine's grammar: the arguments validate every time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.support.family_templates import FAMILIES, build_family_checkpoint, literal_grammar
from tests.support.stack import Stack

pytest.importorskip("xgrammar")

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris for two days?"}]


@pytest.fixture(scope="module")
def family_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("families")
    dirs = {
        f: build_family_checkpoint(root / f"fam-{f}", f, seed=i) for i, f in enumerate(FAMILIES)
    }
    stack = Stack.create(root / "stack", dirs["llama3_json"])
    try:
        for d in dirs.values():
            stack.start_worker("--max-num-seqs", "16", model_dir=d)
        stack.start_api()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def client(family_stack: Stack) -> openai.OpenAI:
    c = openai.OpenAI(base_url=f"{family_stack.api.url}/v1", api_key="unused", max_retries=0)
    want = {f"fam-{f}" for f in FAMILIES}
    import time

    deadline = time.monotonic() + 60
    while {m.id for m in c.models.list().data} < want and time.monotonic() < deadline:
        time.sleep(0.2)
    return c


def check_calls(calls, names: list[str] | None = None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    if names is not None:
        assert [c.function.name for c in calls] == names


def reassemble(chunks) -> tuple[str, dict[int, dict], str | None]:
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
            finish = ch.finish_reason or finish
    return content, calls, finish


def as_dicts(calls) -> dict[int, dict]:
    return {
        i: {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for i, c in enumerate(calls or [])
    }


def without_ids(calls: dict[int, dict]) -> dict[int, dict]:
    """Ids derive from the job id: two requests have different ones."""
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())
    return {i: {k: v for k, v in c.items() if k != "id"} for i, c in calls.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip(client: openai.OpenAI, family: str) -> None:
    """tools -> tool_calls (parsed from the family's own format) -> tool message -> answer."""
    model, call_text = f"fam-{family}", FAMILIES[family][2]
    first = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        max_tokens=300,
        extra_body={"guided_grammar": literal_grammar(call_text)},
    )
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    check_calls(msg.tool_calls, ["get_weather"])
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "days": 2}
    history = [
        *ASK,
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temp_c": 21}'},
    ]
    answer = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=16, seed=1
    )
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)
    # The history reached the template: the prompt grew by the call and the result.
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 10


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_required_and_named_are_enforced_by_the_grammar(client: openai.OpenAI, family: str) -> None:
    model = f"fam-{family}"
    for seed in range(3):
        resp = client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,  # one call: a random model would list calls on and on
            max_tokens=300,
            seed=seed,
        )
        assert resp.choices[0].finish_reason == "tool_calls", resp.choices[0].message
        check_calls(resp.choices[0].message.tool_calls)
        resp = client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            parallel_tool_calls=False,
            max_tokens=100,
            seed=seed,
        )
        check_calls(resp.choices[0].message.tool_calls, ["get_time"])


@pytest.mark.parametrize(
    ("family", "kwargs"),
    [
        (
            "qwen25_hermes",
            {"extra_body": {"guided_grammar": literal_grammar(FAMILIES["qwen25_hermes"][2])}},
        ),
        ("mistral", {"extra_body": {"guided_grammar": literal_grammar(FAMILIES["mistral"][2])}}),
        ("llama3_json", {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ("qwen3_hermes", {"tool_choice": "required", "parallel_tool_calls": False}),
    ],
)
def test_streamed_tool_call_deltas_reassemble_to_the_response(
    client: openai.OpenAI, family: str, kwargs: dict
) -> None:
    args = dict(model=f"fam-{family}", messages=ASK, tools=TOOLS, max_tokens=300, seed=7, **kwargs)
    whole = client.chat.completions.create(**args)
    content, calls, finish = reassemble(client.chat.completions.create(**args, stream=True))
    msg = whole.choices[0].message
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    assert without_ids(calls) == without_ids(as_dicts(msg.tool_calls))
    assert (content or None) == (msg.content or None) or not content.strip()


def test_parallel_calls_in_one_answer(client: openai.OpenAI) -> None:
    two = (
        FAMILIES["qwen3_hermes"][2]
        + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    )
    args = dict(
        model="fam-qwen3_hermes",
        messages=ASK,
        tools=TOOLS,
        max_tokens=400,
        extra_body={"guided_grammar": literal_grammar(two)},
    )
    resp = client.chat.completions.create(**args)
    check_calls(resp.choices[0].message.tool_calls, ["get_weather", "get_time"])
    _, calls, _ = reassemble(client.chat.completions.create(**args, stream=True))
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    one = client.chat.completions.create(**args, parallel_tool_calls=False)
    check_calls(one.choices[0].message.tool_calls, ["get_weather"])


def test_reasoning_split_and_enable_thinking(client: openai.OpenAI, family_stack: Stack) -> None:
    model = "fam-qwen3_hermes"
    think = "<think>\nThe user wants weather.\n</think>\n\nIt is sunny."
    args = dict(
        model=model,
        messages=ASK,
        max_tokens=200,
        extra_body={"guided_grammar": literal_grammar(think)},
    )
    whole = client.chat.completions.create(**args)
    msg = whole.choices[0].message
    assert msg.reasoning_content == "\nThe user wants weather.\n"
    assert msg.content == "It is sunny."
    chunks = list(client.chat.completions.create(**args, stream=True))
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == (msg.reasoning_content, msg.content)
    # enable_thinking=False: the template closes the think block in the prompt; no split.
    off = client.chat.completions.create(
        model=model,
        messages=ASK,
        max_tokens=200,
        extra_body={
            "guided_grammar": literal_grammar(think),
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    assert off.choices[0].message.content == think
    assert off.usage.prompt_tokens > whole.usage.prompt_tokens  # the closed block is in the prompt


def test_jobs_api_and_reattach_carry_tool_calls(family_stack: Stack) -> None:
    api = family_stack.api.url
    body = {
        "model": "fam-qwen3_hermes",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 300,
        "seed": 3,
        "stream": True,
    }
    job = httpx.post(f"{api}/v1/jobs", json=body, timeout=30).json()
    import time

    deadline = time.monotonic() + 60
    while (view := httpx.get(f"{api}/v1/jobs/{job['id']}", timeout=30).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert view["status"] == "completed"
    message = view["choices"][0]["message"]
    assert view["choices"][0]["finish_reason"] == "tool_calls"
    for call in message["tool_calls"]:
        jsonschema.validate(
            json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]]
        )

    def events(after: str | None) -> list[dict]:
        headers = {"Last-Event-ID": after} if after else {}
        out = []
        with httpx.stream(
            "GET", f"{api}/v1/jobs/{job['id']}/events", headers=headers, timeout=30
        ) as r:
            event_id = None
            for line in r.iter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: ") and line != "data: [DONE]":
                    out.append({**json.loads(line[6:]), "event_id": event_id})
                    event_id = None
        return out

    full = events(None)
    calls = [
        tc for e in full for ch in e.get("choices", []) for tc in ch["delta"].get("tool_calls", [])
    ]
    got = {c["index"]: c for c in calls}
    assert {
        i: {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for i, c in got.items()
    } == {
        i: {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for i, c in enumerate(message["tool_calls"])
    }
    # Re-attach after the first event with an id: the rest arrives, nothing repeated.
    ids = [e["event_id"] for e in full if e["event_id"]]
    assert ids
    rest = events(ids[0])
    assert [e["event_id"] for e in rest if e["event_id"]] == ids[1:]


def test_unknown_named_function_and_tool_choice_shapes(family_stack: Stack) -> None:
    api = family_stack.api.url
    base = {"model": "fam-qwen3_hermes", "messages": ASK, "tools": TOOLS, "max_tokens": 5}
    cases = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "function.name"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "defined twice"),
        (
            {
                "tool_choice": "required",
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "not": {}}},
                    }
                ],
            },
            "'not'",
        ),
        ({"tool_choice": "required", "guided_regex": "a"}, "cannot be combined"),
    ]
    for extra, named in cases:
        r = httpx.post(f"{api}/v1/chat/completions", json={**base, **extra}, timeout=30)
        assert r.status_code == 400 and named in r.json()["error"]["message"], (extra, r.text)


def test_template_renders_tools_and_history(tmp_path: Path) -> None:
    """The prompt text itself, per family: tools offered, call and result written back."""
    from services.api.jobs.builder import chat_messages
    from services.api.openai.schemas import ChatCompletionRequest
    from shared.tokenizer import load_tokenizer

    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abcdefghi",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "days": 2}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abcdefghi", "content": "sunny 21C"},
    ]
    for family in FAMILIES:
        tok = load_tokenizer(build_family_checkpoint(tmp_path / family, family))
        req = ChatCompletionRequest.model_validate({"model": "m", "messages": history})
        text = tok.apply_chat_template(chat_messages(req), tools=TOOLS)
        assert '"name": "get_weather"' in text, family
        assert '"city": "Paris"' in text and "sunny 21C" in text, family
        assert "Forecast" in text, family  # the tool's description reached the prompt
