"""A chunk spliced from its template is the chunk the schema renders, for any text, in
both streaming endpoints, and a template is refused where the text is not one string."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.openai.chunk_template import splice, text_template
from services.api.openai.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
)


def completion_chunk(text: str) -> str:
    choice = CompletionChoice(index=2, text=text, logprobs=None, finish_reason=None)
    return CompletionResponse(id="cmpl-x", created=7, model="m", choices=[choice]).model_dump_json()


def chat_chunk(text: str) -> str:
    choice = ChatChunkChoice(index=1, delta=ChatDelta(content=text))
    return ChatCompletionChunk(
        id="chatcmpl-x", created=7, model="m", choices=[choice]
    ).model_dump_json()


@pytest.mark.parametrize("render", [completion_chunk, chat_chunk])
@given(text=st.text())
def test_a_spliced_chunk_is_the_rendered_chunk(render: Callable[[str], str], text: str) -> None:
    spliced = splice(text_template(render), text)
    assert json.loads(spliced) == json.loads(render(text))


@pytest.mark.parametrize("render", [completion_chunk, chat_chunk])
def test_plain_text_splices_to_the_same_bytes(render: Callable[[str], str]) -> None:
    for text in [" hello", "", 'a "quote" and \\ back', "tab\tnew\nline", "日本語 ✓"]:
        assert splice(text_template(render), text) == render(text)


def test_a_renderer_that_drops_the_text_has_no_template() -> None:
    with pytest.raises(ValueError):
        text_template(lambda text: json.dumps({"length": len(text)}))
