"""Tool-call parsing and think splitting: each family's real output format, and any way a
stream cuts the text gives the same pieces as the whole text at once."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.openai.chat import assemble_message
from services.api.structured.chat_output import ChatOutputPlan, ChatPart
from services.api.structured.tool_parsers import detect_family

ARGS = {"city": "Paris", "days": 2}
OUTPUTS = {
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", ARGS), ("get_time", {})],
    ),
    "llama3_json": (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; {"name": "get_time", "parameters": {}}',
        None,
        [("get_weather", ARGS), ("get_time", {})],
    ),
    "mistral": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, {"name": "get_time", "arguments": {}}]',
        None,
        [("get_weather", ARGS), ("get_time", {})],
    ),
}


def run(plan: ChatOutputPlan, pieces: list[str]):
    parser = plan.parser("job1:0")
    parts = [parser.feed(p) for p in pieces]
    parts.append(parser.finish())
    return assemble_message(parts), parts


def cuts(text: str):
    return st.lists(st.integers(0, len(text)), max_size=8).map(
        lambda idx: [
            text[a:b] for a, b in zip([0, *sorted(idx)], [*sorted(idx), len(text)], strict=True)
        ]
    )


def calls_of(msg):
    return [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls or []]


def test_each_family_parses_its_own_format() -> None:
    for family, (text, content, calls) in OUTPUTS.items():
        msg, _ = run(ChatOutputPlan(tool_mode="auto", family=family), [text])
        assert msg.content == content, family
        assert calls_of(msg) == calls, family
        assert len({c.id for c in msg.tool_calls}) == len(calls)


def test_mistral_without_the_special_token_and_llama_without_python_tag() -> None:
    text = '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]'
    msg, _ = run(ChatOutputPlan(tool_mode="auto", family="mistral"), [text])
    assert calls_of(msg) == [("get_weather", ARGS)]
    msg, _ = run(
        ChatOutputPlan(tool_mode="auto", family="llama3_json"), ['{"name": "f", "parameters": {}}']
    )
    assert calls_of(msg) == [("f", {})]


def test_plain_answers_stay_content() -> None:
    for family in OUTPUTS:
        for text in ["Hello there.", "{not json", "[1, 2]", "<tool_call>oops</tool_call> done"]:
            msg, _ = run(ChatOutputPlan(tool_mode="auto", family=family), [text])
            assert msg.content == text and msg.tool_calls is None, (family, text)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_stream_split_reassembles_to_the_whole(data) -> None:
    for family, (text, _, _) in OUTPUTS.items():
        pieces = data.draw(cuts(text))
        plan = ChatOutputPlan(tool_mode="auto", family=family)
        assert run(plan, pieces)[0] == run(plan, [text])[0]


def test_hermes_sends_a_call_as_soon_as_it_closes() -> None:
    text = OUTPUTS["hermes"][0]
    first_end = text.index("</tool_call>") + len("</tool_call>")
    parser = ChatOutputPlan(tool_mode="auto", family="hermes").parser("s")
    part = parser.feed(text[:first_end])
    assert [c.name for c in part.calls] == ["get_weather"]


def test_named_streams_arguments_and_required_parses_the_array() -> None:
    plan = ChatOutputPlan(tool_mode="named", named="get_weather")
    msg, parts = run(plan, ['{"city": ', '"Paris", "days": 2}'])
    assert calls_of(msg) == [("get_weather", ARGS)]
    assert parts[0].calls[0].name == "get_weather" and parts[1].calls[0].name is None
    plan = ChatOutputPlan(tool_mode="required")
    msg, _ = run(plan, ['[{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}]'])
    assert calls_of(msg) == [("get_weather", ARGS)]


def test_call_ids_are_deterministic_per_scope() -> None:
    plan = ChatOutputPlan(tool_mode="auto", family="hermes")
    a, _ = run(plan, [OUTPUTS["hermes"][0]])
    b, _ = run(plan, [OUTPUTS["hermes"][0]])
    assert [c.id for c in a.tool_calls] == [c.id for c in b.tool_calls]


THINK = "<think>\nThe user wants a greeting.\n</think>\n\nHello!"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_reasoning_split_any_cut(data) -> None:
    plan = ChatOutputPlan(reasoning=True)
    msg, _ = run(plan, data.draw(cuts(THINK)))
    assert msg.reasoning_content == "\nThe user wants a greeting.\n"
    assert msg.content == "Hello!"


def test_reasoning_when_the_prompt_opened_the_block_and_when_there_is_none() -> None:
    msg, _ = run(ChatOutputPlan(reasoning=True, prompt_opens_think=True), ["hmm</think>\n\nHi"])
    assert (msg.reasoning_content, msg.content) == ("hmm", "Hi")
    msg, _ = run(ChatOutputPlan(reasoning=True), ["Just an answer."])
    assert (msg.reasoning_content, msg.content) == (None, "Just an answer.")
    msg, _ = run(ChatOutputPlan(reasoning=True), ["<think>cut by max_tokens"])
    assert (msg.reasoning_content, msg.content) == ("cut by max_tokens", "")


def test_reasoning_then_a_tool_call() -> None:
    plan = ChatOutputPlan(tool_mode="auto", family="hermes", reasoning=True)
    msg, _ = run(plan, ["<think>need weather</think>\n\n" + OUTPUTS["hermes"][0]])
    assert msg.reasoning_content == "need weather"
    assert calls_of(msg)[0] == ("get_weather", ARGS)


def test_family_detection() -> None:
    from tests.support.family_templates import LLAMA3, MISTRAL, QWEN3, QWEN25

    assert detect_family(QWEN25) == detect_family(QWEN3) == "hermes"
    assert detect_family(LLAMA3) == "llama3_json"
    assert detect_family(MISTRAL) == "mistral"
    assert detect_family("{{ messages }}") is None


def test_empty_part_is_falsy() -> None:
    assert not ChatPart() and ChatPart(content="x")


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    plan = ChatOutputPlan(tool_mode="auto", family="hermes", parallel=False)
    msg, _ = run(plan, [OUTPUTS["hermes"][0]])
    assert calls_of(msg) == [("get_weather", ARGS)]
