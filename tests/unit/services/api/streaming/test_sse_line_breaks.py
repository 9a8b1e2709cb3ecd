"""An SSE event stays one line even when its text holds Unicode line separators."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from services.api.openai.completions import _text_template
from services.api.streaming.sse import format_event


@given(st.text())
def test_any_text_is_one_data_line_that_parses_back(text: str) -> None:
    before, after = _text_template("cmpl-x", 1, "m", 0)
    event = format_event(before + json.dumps(text, ensure_ascii=False) + after, "j:3")
    lines = event.decode().splitlines()  # splits on \x85, \u2028, \u2029 too
    assert lines[0] == "id: j:3" and lines[2:] == [""]
    payload = json.loads(lines[1].removeprefix("data: "))
    assert payload["choices"][0]["text"] == text
    assert payload["choices"][0]["finish_reason"] is None
