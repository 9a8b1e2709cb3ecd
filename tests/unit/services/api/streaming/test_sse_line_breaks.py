"""An SSE event stays one line even when its text holds Unicode line separators."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from services.api.openai.chunk_template import splice, text_template
from services.api.streaming.sse import format_event
from tests.unit.services.api.openai.test_chunk_template import chat_chunk


@given(st.text())
def test_any_text_is_one_data_line_that_parses_back(text: str) -> None:
    template = text_template(chat_chunk)
    event = format_event(splice(template, text), "j:3")
    lines = event.decode().splitlines()  # splits on \x85, \u2028, \u2029 too
    assert lines[0] == "id: j:3" and lines[2:] == [""]
    payload = json.loads(lines[1].removeprefix("data: "))
    assert payload["choices"][0]["delta"]["content"] == text
    assert payload["choices"][0]["finish_reason"] is None
