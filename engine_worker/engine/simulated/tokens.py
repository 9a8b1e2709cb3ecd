"""Deterministic stand-in tokens: a hash of the context's tail and its length.

The same context always yields the same next token, whatever else is in the batch, so
a stream's text can be checked against an in-process run, and a worker that takes a
job over (re-prefilling prompt + produced tokens) continues with exactly the tokens an
uninterrupted run would have produced. End-of-sequence ids are never drawn, so every
completion runs to max_tokens.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def allowed_token_ids(vocab_size: int, excluded: set[int]) -> list[int]:
    """Ids the stand-in may emit: the vocabulary minus end-of-sequence and special ids."""
    ids = [t for t in range(vocab_size) if t not in excluded]
    if not ids:
        raise ValueError("no token id left to simulate with")
    return ids


def next_token(token_ids: list[int], allowed: list[int]) -> int:
    """The token that follows `token_ids` (prompt + output so far)."""
    n = len(token_ids)
    last = token_ids[-1] if n else 0
    prev = token_ids[-2] if n > 1 else 0
    h = mix64((last << 24) ^ (prev << 44) ^ n)
    return allowed[h % len(allowed)]
