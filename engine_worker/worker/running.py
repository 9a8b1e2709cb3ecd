"""The jobs a worker has handed to its engine, shared by intake, outbox and lifecycle.

Intake adds a job when it admits it, the outbox forgets it once its final Delta is stored
(or it is dropped), and shutdown waits for the table to empty before handing back what
is left. Each admission gets a fresh engine request id (`job id@n`), so a late output of
an earlier admission of the same job (aborted, then taken back) is never mistaken.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from engine_worker.worker.job_state import JobState


@dataclass
class RunningJobs:
    _by_id: dict[str, JobState] = field(default_factory=dict)
    _admissions: int = 0
    _empty: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._empty.set()

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._by_id

    def get(self, job_id: str) -> JobState | None:
        return self._by_id.get(job_id)

    def states(self) -> list[JobState]:
        return list(self._by_id.values())

    def admit(self, state: JobState) -> str:
        """Record `state` as running under a fresh engine request id, which it returns."""
        self._admissions += 1
        state.request_id = f"{state.id}@{self._admissions}"
        self._by_id[state.id] = state
        self._empty.clear()
        return state.request_id

    def state_of(self, request_id: str) -> JobState | None:
        """The job an engine request belongs to, if that admission is still current."""
        state = self._by_id.get(request_id.rpartition("@")[0])
        return state if state is not None and state.request_id == request_id else None

    def forget(self, state: JobState) -> None:
        if self._by_id.get(state.id) is state:
            del self._by_id[state.id]
        if not self._by_id:
            self._empty.set()

    def take_all(self) -> list[JobState]:
        """Forget every job at once (shutdown hands them back) and return them."""
        states = list(self._by_id.values())
        self._by_id.clear()
        self._empty.set()
        return states

    async def wait_empty(self, timeout_s: float) -> bool:
        """True once no job runs; False if some still do after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        return self._empty.is_set()
