"""A progress bar for long work a person waits on (demo training, model transfers).

On a terminal one line redraws in place; elsewhere (a pipe, a log file, a container) the
bar is silent and the caller's plain progress lines are the record. No dependency: a bar
is a carriage return and a few characters.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
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
    count: Callable[[int], str] = str  # how done/total read (steps, or bytes)

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
            f"{self.label} [{bar}] {self.count(self.done)}/{self.count(self.total)} "
            f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left{tail}\x1b[K"
        )

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass
class ByteProgress:
    """Bytes moved so far, for transfers (`update(n)` after each n bytes); silent off a TTY."""

    bar: ProgressBar | None = None

    @classmethod
    def start(cls, total: int, label: str, enabled: bool | None = None) -> ByteProgress:
        bar = ProgressBar(total=total, label=label, count=human_bytes)
        if enabled is None:
            enabled = bar.live
        return cls(bar if enabled else None)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.done + n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def callback(self) -> Callable[[int], None]:
        return self.update
