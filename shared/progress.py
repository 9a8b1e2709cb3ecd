"""A byte progress bar on a terminal, silence elsewhere (logs say when transfers start/end)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ByteProgress:
    """`update(n)` after each n bytes moved; `close()` at the end. A no-op off a TTY."""

    bar: Any = None

    @classmethod
    def start(cls, total: int, label: str, enabled: bool | None = None) -> ByteProgress:
        if enabled is None:
            enabled = sys.stderr.isatty()
        if not enabled:
            return cls()
        from tqdm import tqdm

        return cls(tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr))

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def callback(self) -> Callable[[int], None]:
        return self.update
