"""Token strings and raw bytes for logprobs, per tokenizer family.

OpenAI reports each logprob token as text plus its UTF-8 bytes. Decoding one token id
alone loses information (a byte-level BPE token may hold half a character), so the raw
bytes are recovered from the vocabulary entry: byte-level BPE maps bytes to printable
characters, SentencePiece-style vocabularies use '▁' for spaces and <0xXX> byte tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tokenizers import Tokenizer

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_level_decoder_table() -> dict[str, int]:
    """Inverse of byte-level BPE's byte -> printable-character mapping.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code
    points from 256 upward, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[str, int] = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def _decoder_types(spec: dict | None) -> set[str]:
    if not spec:
        return set()
    types = {spec.get("type", "")}
    for sub in spec.get("decoders") or []:
        types |= _decoder_types(sub)
    return types


def token_display(raw: bytes) -> str:
    """Text for a token; bytes that are not valid UTF-8 are shown OpenAI-style."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class TokenTexts:
    """Cached id -> (display string, bytes) for one tokenizer."""

    tokenizer: Tokenizer
    _byte_level: bool = False
    _table: dict[str, int] = field(default_factory=dict)
    _cache: dict[int, tuple[str, list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = json.loads(self.tokenizer.to_str()).get("decoder")
        self._byte_level = "ByteLevel" in _decoder_types(spec)
        if self._byte_level:
            self._table = byte_level_decoder_table()

    def raw_bytes(self, token_id: int) -> bytes:
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            return b""
        if self._byte_level and all(c in self._table for c in token):
            return bytes(self._table[c] for c in token)
        m = _BYTE_TOKEN.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode()

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self.raw_bytes(token_id)
            hit = self._cache[token_id] = (token_display(raw), list(raw))
        return hit
