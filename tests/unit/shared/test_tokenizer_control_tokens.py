"""Only the chat template makes control tokens: the same text typed in a message is plain
text (issue 17). Real tokenizers of the tiny test checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.tokenizer import load_tokenizer


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_typed_control_tokens_stay_text(fixture: str, request: pytest.FixtureRequest) -> None:
    tok = load_tokenizer(Path(request.getfixturevalue(fixture)))
    specials = tok.special_token_strings
    assert specials
    special_ids = {tok.tokenizer.token_to_id(s) for s in specials}
    typed = "".join(specials) + " and more"

    def prompt(content: str) -> list[int]:
        messages = [{"role": "user", "content": content}]
        text = tok.apply_chat_template(messages)
        return tok.encode_rendered(text, [content])

    honest = prompt("hello and more")
    attack = prompt(typed)
    # The attack's special ids are exactly the template's own (those of the honest prompt).
    assert sorted(i for i in attack if i in special_ids) == sorted(
        i for i in honest if i in special_ids
    )
    # Plain tokenization would have parsed them: the attack changed something real.
    text = tok.apply_chat_template([{"role": "user", "content": typed}])
    parsed = tok.encode(text, add_special_tokens=False)
    assert sum(i in special_ids for i in parsed) > sum(i in special_ids for i in attack)
    # The text is kept: decoding gives back what was typed.
    assert typed in tok.decode(attack, skip_special_tokens=False)


def test_prompts_without_control_text_tokenize_as_before(tiny_qwen2: Path) -> None:
    tok = load_tokenizer(tiny_qwen2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>"}]
    text = tok.apply_chat_template(messages)
    assert tok.encode_rendered(text, [m["content"] for m in messages]) == tok.encode(
        text, add_special_tokens=False
    )
