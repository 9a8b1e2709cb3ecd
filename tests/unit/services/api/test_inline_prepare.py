"""Which completion prompts are prepared on the event loop instead of a tokenizer thread."""

from __future__ import annotations

import pytest

from services.api.state import INLINE_PROMPT_CHARS, cheap_prompt


@pytest.mark.parametrize(
    ("prompt", "inline"),
    [
        ([1, 2, 3], True),  # token ids: no tokenizer work at all
        ([[1, 2], [3]], True),
        ("hello", True),
        ("x" * INLINE_PROMPT_CHARS, True),
        ("x" * (INLINE_PROMPT_CHARS + 1), False),
        (["a" * 600, "b" * 600], False),  # the texts together count
        (["a", "b"], True),
        ([], True),  # refused before any tokenizing
    ],
)
def test_cheap_prompts(prompt, inline: bool) -> None:
    assert cheap_prompt(prompt) is inline
