"""A progress bar for long work a person waits on (the demo model's training).

On a terminal one line redraws in place; elsewhere (a pipe, a log file, a container) the
bar is silent and the caller's plain progress lines are the record. No dependency: a bar
is a carriage return and a few characters.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

WIDTH = 30


@dataclass
class ProgressBar:
    total: int
    label: str
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    done: int = 0
    note: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def live(self) -> bool:
        return self.stream.isatty()

    def update(self, done: int, note: str = "") -> None:
        self.done, self.note = min(done, self.total), note
        if self.live:
            self.stream.write("\r" + self.render())
            self.stream.flush()

    def say(self, msg: str) -> None:
        """A line of its own above the bar (plain on a pipe)."""
        if self.live:
            self.stream.write("\r\x1b[K" + msg + "\n" + self.render())
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def render(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(WIDTH * frac)
        elapsed = time.monotonic() - self.started
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * filled + "-" * (WIDTH - filled)
        tail = f" {self.note}" if self.note else ""
        return (
            f"{self.label} [{bar}] {self.done}/{self.total} "
            f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left{tail}\x1b[K"
        )

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
