"""Stop strings matched on detokenized text, across arbitrary piece boundaries.

A stop string can arrive split over several deltas ("</" then "s>"), so text that ends
with a proper prefix of some stop string is held back until it either completes the stop
string (output ends before it, the job is cancelled) or diverges (released).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopStringMatcher:
    """Per-completion state; `feed` returns (text safe to emit, whether a stop string hit)."""

    stops: list[str]
    held: str = ""
    stopped: bool = False
    matched: str | None = field(default=None)

    def __post_init__(self) -> None:
        self.stops = [s for s in self.stops if s]
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.held + text
        hit = self._earliest_stop(buf)
        if hit is not None:
            pos, stop = hit
            self.stopped, self.matched, self.held = True, stop, ""
            return buf[:pos], True
        keep = self._partial_suffix_len(buf)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The completion ended without a stop string: release what was held back."""
        out, self.held = self.held, ""
        return "" if self.stopped else out

    def _earliest_stop(self, buf: str) -> tuple[int, str] | None:
        """The stop string that completes first (smallest end; ties: earliest start).

        Ranking by end, not start, makes the result independent of how the text was
        split into pieces: a generator stops as soon as any stop string is complete.
        """
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            pos = buf.find(stop)
            if pos != -1:
                key = (pos + len(stop), pos, stop)
                if best is None or key < best:
                    best = key
        return None if best is None else (best[1], best[2])

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0
