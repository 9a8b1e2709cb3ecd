"""The chat template is found where transformers saves it: chat_template.jinja first, then
chat_template.json, then tokenizer_config.json's key."""

from __future__ import annotations

import json

from shared.tokenizer import load_tokenizer_files
from tests.support.model_factory import train_tokenizer

IN_CONFIG = "{{ 'from config' }}"
IN_JINJA = "{{ 'from jinja' }}"
IN_JSON = "{{ 'from json' }}"


def _files(**extra: bytes) -> dict[str, bytes]:
    config = {"eos_token": "</s>", "chat_template": IN_CONFIG}
    return {
        "tokenizer.json": train_tokenizer().to_str().encode(),
        "tokenizer_config.json": json.dumps(config).encode(),
        **extra,
    }


def test_the_config_key_alone() -> None:
    assert load_tokenizer_files(_files()).chat_template == IN_CONFIG


def test_the_jinja_file_wins() -> None:
    files = _files(**{
        "chat_template.jinja": IN_JINJA.encode(),
        "chat_template.json": json.dumps({"chat_template": IN_JSON}).encode(),
    })  # fmt: skip
    bundle = load_tokenizer_files(files)
    assert bundle.chat_template == IN_JINJA
    assert bundle.apply_chat_template([{"role": "user", "content": "x"}]) == "from jinja"
    assert "chat_template.jinja" in bundle.files()  # travels to the API with the rest


def test_the_json_file_over_the_config() -> None:
    files = _files(**{"chat_template.json": json.dumps({"chat_template": IN_JSON}).encode()})
    assert load_tokenizer_files(files).chat_template == IN_JSON
