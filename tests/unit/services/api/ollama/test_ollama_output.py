"""The output parser: content, thinking and tool calls, independent of how text is split."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from services.api.ollama.output import OutputParser, Parsed, parse_tool_calls


def run(text_pieces: list[str], think=False, tools=False, thinking_open=False) -> Parsed:
    parser = OutputParser.create(think, tools, thinking_open)
    out = Parsed()
    for piece in text_pieces:
        out.extend(parser.feed(piece))
    out.extend(parser.finish())
    return out


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


SAMPLES = [
    "<think>weighing it</think>\n\nThe answer is 4.",
    'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '{"name": "add", "parameters": {"a": 1, "b": 2}}',
    '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{\\"x\\": 1}"}]',
    "plain text with < and <tool and <think but no tags",
    "<tool_call>not json</tool_call> tail",
    "{not a call",
]


@given(st.sampled_from(SAMPLES), st.lists(st.integers(0, 400), max_size=8), st.booleans())
def test_result_does_not_depend_on_the_split(text, cuts, think) -> None:
    assert run(splits(text, cuts), think, True) == run([text], think, True)


def test_plain_text_passes_untouched() -> None:
    text = "  <think>x</think> {json} <tool_call>"
    assert run([text]).content == text


def test_thinking_is_split_out() -> None:
    out = run(["<think>weighing it</think>\n\nThe answer is 4."], think=True)
    assert (out.thinking, out.content) == ("weighing it", "The answer is 4.")
    opened = run(["still thinking</think>done"], think=True, thinking_open=True)
    assert (opened.thinking, opened.content) == ("still thinking", "done")


def test_tool_calls_have_object_arguments() -> None:
    out = run([SAMPLES[1]], tools=True)
    assert out.content == "Let me check."
    assert out.tool_calls == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    llama = run([SAMPLES[2]], tools=True)
    assert llama.tool_calls[0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert [c["function"]["arguments"] for c in run([SAMPLES[3]], tools=True).tool_calls] == [
        {},
        {"x": 1},
    ]


def test_what_is_not_a_call_stays_content() -> None:
    assert run([SAMPLES[5]], tools=True).content == SAMPLES[5]
    assert run([SAMPLES[6]], tools=True).content == SAMPLES[6]
    assert parse_tool_calls('{"name": 3}') is None
    assert parse_tool_calls("[]") is None
