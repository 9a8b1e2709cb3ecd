"""Incremental detokenization: text pieces that concatenate to the full decode.

Decoding one token at a time is wrong for byte-level BPE (a character's UTF-8 bytes can
span tokens) and for tokenizers whose decode of a token depends on its neighbours
(leading-space handling, merges). So, like vLLM and TGI, each step decodes a short window
of tokens twice — from `prefix_offset` to `read_offset` (already emitted) and from
`prefix_offset` to the end — and emits the difference; text ending in U+FFFD (an
incomplete UTF-8 sequence) is held back until a later token completes it.

One case no streaming decoder can get right: a ByteFallback decoder renders an invalid
run of byte tokens as one U+FFFD per byte, so a valid byte already emitted may turn into
U+FFFD in the one-shot decode once an invalid byte follows. Only garbage bytes differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """Per-completion state; `add` returns the new text, `flush` whatever was held back."""

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the text that is now final (possibly "")."""
        if not new_token_ids:
            return ""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # Nothing new, or an incomplete character: wait for the next token.
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of a completion: emit held-back text, U+FFFD included."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]
