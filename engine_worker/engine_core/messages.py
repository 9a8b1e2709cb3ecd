"""Every message between the worker and its engine core, declared in one module.

Commands go to the engine (add, abort, stop); a StepResult comes back after each engine
step (or after commands when idle); EngineInfo comes back once, when the engine is
built. The same objects cross a thread boundary (EngineThread) or a process boundary
(EngineProcess, which encodes them with `codec`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_worker.engine.outputs import EngineStats, RequestOutput
from engine_worker.worker.model_facts import ModelFacts
from shared.sampling_params import SamplingParams


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    resume_token_ids: list[list[int]] | None = None  # takeover: tokens already produced


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class Stop:
    """Apply nothing after this; the core's loop returns."""


Command = AddRequest | AbortRequest | Stop


@dataclass
class StepResult:
    """What the loop learns after each engine step (or after commands when idle)."""

    outputs: list[RequestOutput]
    stats: EngineStats
    # How many new requests the scheduler would start now (0 while anything waits or the
    # cache is full): the worker pulls at most this many jobs minus its unapplied adds.
    admit_slots: int
    adds_applied: int  # total AddRequests applied so far, to count the ones still in flight
    step_time_s: float = 0.0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request_id, reason)
    fatal: str | None = None  # the engine raised: it is no longer usable
    # Prefix-cache block hashes stored and evicted by this step (and the commands before
    # it): announced to the API replicas as one KV event (worker/routing/kv_announcer.py).
    kv_stored: list[bytes] = field(default_factory=list)
    kv_evicted: list[bytes] = field(default_factory=list)


@dataclass
class EngineInfo:
    """What the worker knows of its engine once it is built, wherever the engine runs."""

    max_model_len: int
    block_size: int  # tokens per KV block: the unit of the prefix hashes it announces
    facts: ModelFacts
    snapshot: StepResult  # its state before any request: stats and free slots
