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
    (n_max >= n >= n_min) found in `tokens`; [] when none is."""
    if k <= 0 or len(tokens) < n_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    length = len(arr)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = arr[length - n :]
        # Windows starting at 0 .. length - n - 1: every occurrence but the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


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
