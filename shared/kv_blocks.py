"""The KV block hash both sides compute: the engine to share cached blocks, the API to
predict which worker already holds a prompt's prefix.

A full block of `block_size` token ids is named by a content hash chained over the
block before it, so equal hashes mean equal prefixes up to and including that block.
One definition here, imported by the engine's block manager and by the API's router:
if they ever differed, routing would silently stop finding cached prefixes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained content hash of one full block; collisions would corrupt outputs, so no `hash()`.

    Token ids as little-endian int64s: the same bytes on every machine (an API replica and
    a worker may differ in architecture), and packed in C, not formatted in Python."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def full_block_hashes(
    token_ids: Sequence[int], block_size: int, max_blocks: int | None = None
) -> list[bytes]:
    """The chained hashes of the prompt's full blocks (at most `max_blocks`), in order."""
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    out: list[bytes] = []
    parent: bytes | None = None
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


def reusable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading full blocks of a prompt an engine can take from its cache: the last
    token is always computed (its logits start the reply), as find_cached_prefix does."""
    return max(num_tokens - 1, 0) // block_size
