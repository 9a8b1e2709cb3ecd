"""A model folder's tokenizer: tokenizer.json, its config, and the chat template.

Shared by the API (tokenize, detokenize, chat template) and the engine's offline API,
without transformers: `tokenizers` for the vocabulary, jinja2 for the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # where transformers' save_pretrained writes the template now
    "chat_template.json",  # an older layout: {"chat_template": ...}
)


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson: plain JSON (jinja2's own escapes <, > and & for HTML)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@dataclass
class TokenizerBundle:
    """Everything text-side a model folder defines."""

    tokenizer: Tokenizer
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    raw_files: dict[str, bytes] = field(default_factory=dict)

    @property
    def bos_token(self) -> str | None:
        return _token_content(self.config.get("bos_token"))

    @property
    def eos_token(self) -> str | None:
        return _token_content(self.config.get("eos_token"))

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    @cached_property
    def compiled_chat_template(self) -> jinja2.Template | None:
        """The chat template compiled once (sandboxed, as transformers renders it):
        compiling it per request cost a chat request milliseconds of the API's CPU."""
        if not self.chat_template:
            return None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        return env.from_string(self.chat_template)

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = self.generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(int(i) for i in gen_eos)
        if self.eos_token is not None:
            tid = self.tokenizer.token_to_id(self.eos_token)
            if tid is not None:
                ids.add(tid)
        return ids

    @cached_property
    def byte_fallback_decoder(self) -> bool:
        """Whether the decoder renders <0xXX> byte tokens (SentencePiece-style): there
        the tokenizers library's DecodeStream and a one-shot decode can disagree on
        invalid byte runs, so streaming keeps its own window
        (services/api/streaming/detokenizer.py)."""
        decoder = self.tokenizer.decoder  # its own JSON only, not the whole tokenizer's
        return decoder is not None and b'"ByteFallback"' in decoder.__getstate__()

    @cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 length of the longest vocabulary entry (added tokens included): an upper
        bound on how many bytes of text one token can stand for, so a text longer than
        `max_token_bytes * n` bytes cannot fit in n tokens, without tokenizing it."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return max((len(t.encode("utf-8")) for t in vocab), default=1)

    @cached_property
    def special_token_strings(self) -> tuple[str, ...]:
        """The text of every special (control) token, longest first."""
        added = self.tokenizer.get_added_tokens_decoder().values()
        return tuple(sorted({t.content for t in added if t.special and t.content}, key=len)[::-1])

    @cached_property
    def literal_tokenizer(self) -> Tokenizer:
        """A copy that encodes special-token text as plain text (own instance: the shared
        one is used from several threads and must not change mode)."""
        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.encode_special_tokens = True
        return tok

    def encode_rendered(self, text: str, contents: list[str]) -> list[int]:
        """A rendered chat prompt where only the template can make control tokens.

        The template's own `<|im_start|>`-style markers are special tokens; the same text
        written by a client (`contents`: every string of the messages and tool definitions,
        see `client_strings`) is encoded as ordinary text, whether the template printed it
        as is or as JSON (`tojson`), so a user cannot open a system turn or end their own.
        Prompts whose client strings hold no special-token text tokenize exactly as before.
        """
        specials = self.special_token_strings
        risky = {c for c in contents if c and any(s in c for s in specials)}
        if not risky:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pos = 0
        for start, end in _content_spans(text, risky):
            ids += self.encode(text[pos:start], add_special_tokens=False)
            ids += self.literal_tokenizer.encode(text[start:end], add_special_tokens=False).ids
            pos = end
        return ids + self.encode(text[pos:], add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **context: Any,
    ) -> str:
        """Render the model's chat template the way transformers does (sandboxed jinja2).

        `context` holds extra template variables, e.g. `tools` or `enable_thinking`.
        """
        template = self.compiled_chat_template
        if template is None:
            raise ValueError("this model has no chat template; use the completions API")
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **context,
        )

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Chat prompts carry their own special tokens in the template text."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def files(self) -> dict[str, bytes]:
        return dict(self.raw_files)


def client_strings(*values: Any) -> list[str]:
    """Every string a client wrote in these template inputs (messages, tools): values and
    dict keys at any depth. Tool names, descriptions, parameter schemas and tool-call
    arguments reach the template as much as message content does."""
    out: list[str] = []
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            out += [k for k in value if isinstance(k, str)]
            stack += value.values()
        elif isinstance(value, list | tuple):
            stack += value
    return out


def _rendered_forms(content: str) -> tuple[str, ...]:
    """How a template can print a client string: as given, trimmed, or inside JSON
    (`tojson`, with and without ASCII escapes)."""
    forms = (
        content,
        content.strip(),
        json.dumps(content, ensure_ascii=False)[1:-1],
        json.dumps(content)[1:-1],
    )
    return tuple(f for f in dict.fromkeys(forms) if f)


def _content_spans(text: str, contents: set[str]) -> list[tuple[int, int]]:
    """Where each client string sits in the rendered text (every occurrence of every form
    it can take there), merged and in order. A string the template changed beyond those
    forms cannot be placed, and is refused rather than tokenized with its control-token
    text live."""
    spans: list[tuple[int, int]] = []
    for content in contents:
        found = False
        for variant in _rendered_forms(content):
            start = text.find(variant)
            while start >= 0:
                spans.append((start, start + len(variant)))
                found = True
                start = text.find(variant, start + len(variant))
        if not found:
            raise ValueError(
                "a message or tool definition holds special-token text that the chat "
                "template changed, so it cannot be kept as plain text"
            )
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def load_tokenizer_files(files: dict[str, bytes]) -> TokenizerBundle:
    """Build a bundle from raw file contents (e.g. fetched from the NATS object store)."""
    if "tokenizer.json" not in files:
        raise ValueError("model folder has no tokenizer.json")
    tok = Tokenizer.from_str(files["tokenizer.json"].decode())
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    gen = json.loads(files["generation_config.json"]) if "generation_config.json" in files else {}
    # A template file wins over tokenizer_config's key, as in transformers.
    if "chat_template.jinja" in files:
        config["chat_template"] = files["chat_template.jinja"].decode()
    elif "chat_template.json" in files:
        config["chat_template"] = json.loads(files["chat_template.json"])["chat_template"]
    return TokenizerBundle(tokenizer=tok, config=config, generation_config=gen, raw_files=files)


def load_tokenizer(model_dir: str | Path) -> TokenizerBundle:
    model_dir = Path(model_dir)
    files = {
        name: (model_dir / name).read_bytes()
        for name in TOKENIZER_FILES
        if (model_dir / name).is_file()
    }
    return load_tokenizer_files(files)
