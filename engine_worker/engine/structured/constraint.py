"""One sequence's grammar state: which tokens may come next, advanced token by token.

The matcher's state is a function of the sequence's output tokens alone, so it needs
no rollback when the scheduler preempts by recompute (the tokens stay, only their KV
is dropped), and a worker taking a job over rebuilds it by replaying the tokens the
job already produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SequenceConstraint:
    matcher: Any  # xgrammar.GrammarMatcher
    num_accepted: int = 0

    @classmethod
    def start(cls, compiled: Any, stop_token_ids: set[int]) -> SequenceConstraint:
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids) or None)
        return cls(matcher)

    def accept(self, token_id: int) -> bool:
        """Advance on an accepted token; False if the grammar forbids it (a bug upstream)."""
        if self.matcher.is_terminated():
            return False
        ok = bool(self.matcher.accept_token(token_id))
        if ok:
            self.num_accepted += 1
        return ok

    def replay(self, token_ids: list[int]) -> None:
        """Bring a fresh matcher to where a resumed sequence left off."""
        for i, token in enumerate(token_ids):
            if not self.accept(token):
                raise ValueError(f"resumed token {i} ({token}) does not fit the output constraint")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
