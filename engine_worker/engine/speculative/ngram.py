"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the
sequence's own last n tokens (n from the longest allowed down to the shortest).

No extra model: it pays off where the output repeats the input (edits, summaries that
quote, code changes), and costs one verification row per proposed token elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def ngram_lookup(tokens: list[int], n_max: int, n_min: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier match of the longest suffix n-gram
    (n_max >= n >= n_min) found in `tokens`; [] when none is.

    One vectorised pass finds the earlier occurrences of the last token; each is then
    extended backwards, latest first, so a step costs microseconds, not a scan per n.
    """
    last = len(tokens) - 1
    if k <= 0 or last < n_min:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    best_n, best_end = 0, -1
    for end in np.flatnonzero(arr[:last] == arr[last])[::-1].tolist():
        n = 1
        while n < n_max and end - n >= 0 and tokens[end - n] == tokens[last - n]:
            n += 1
        if n > best_n:
            best_n, best_end = n, end
            if n == n_max:
                break
    if best_n < n_min:
        return []
    return tokens[best_end + 1 : best_end + 1 + k]


@dataclass(frozen=True)
class NgramProposer:
    """The `--speculative-method ngram` proposer; stateless, so preemption, prefix caching
    and takeover need nothing from it."""

    n_max: int
    n_min: int

    def propose(self, histories: list[list[int]], limits: list[int]) -> list[list[int]]:
        """Proposals per sequence (its tokens so far), at most `limits[i]` tokens each."""
        return [
            ngram_lookup(tokens, self.n_max, self.n_min, limit)
            for tokens, limit in zip(histories, limits, strict=True)
        ]
