"""The engine's own thread: the only place engine methods are called.

`LLMEngine.step()` is blocking CPU/GPU work and the engine is not thread-safe, so one
dedicated thread owns it. The asyncio side sends commands through a thread-safe inbox;
the thread applies them between steps and posts each step's outputs back onto the event
loop with `call_soon_threadsafe`. The loop therefore never blocks on the engine, and the
engine never waits for NATS.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from engine_worker.engine.llm_engine import EngineStats, LLMEngine
from engine_worker.engine.outputs import RequestOutput
from shared.sampling_params import SamplingParams

RANK_REAP_WAIT_S = 2.0  # how long a failed step waits to learn whether a rank died


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
class _Stop:
    pass


Command = AddRequest | AbortRequest | _Stop


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


def admit_slots(engine: LLMEngine) -> int:
    """New requests the engine can start right now without queueing inside it."""
    if not engine.can_admit(1):
        return 0
    stats = engine.stats()
    return max(engine.config.max_num_seqs - stats.num_running - stats.num_waiting, 0)


class EngineThread:
    """Runs `engine` in a daemon thread; `on_result` is called on `loop` after each step."""

    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        on_result: Callable[[StepResult], None],
        idle_wait_s: float = 0.5,
    ) -> None:
        self.engine = engine
        self._loop = loop
        self._on_result = on_result
        self._idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._adds_applied = 0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- called from the event loop ------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def add(self, request: AddRequest) -> None:
        self._inbox.put(request)

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    def stop(self) -> None:
        self._inbox.put(_Stop())

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread --------------------------------------------------
    def _next_commands(self) -> list[Command]:
        """Block briefly only when the engine has nothing to do."""
        commands: list[Command] = []
        if not self.engine.has_unfinished_requests():
            try:
                commands.append(self._inbox.get(timeout=self._idle_wait_s))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[Command], rejected: list[tuple[str, str]]) -> bool:
        """Apply inbox commands in order; False once a stop was requested."""
        for cmd in commands:
            if isinstance(cmd, _Stop):
                return False
            if isinstance(cmd, AbortRequest):
                self.engine.abort_request(cmd.request_id)
                continue
            self._adds_applied += 1
            try:
                self.engine.add_request(
                    cmd.request_id,
                    cmd.prompt_token_ids,
                    cmd.params,
                    priority=cmd.priority,
                    resume_token_ids=cmd.resume_token_ids,
                )
            except ValueError as e:
                rejected.append((cmd.request_id, str(e)))
        return True

    def _post(self, result: StepResult) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_result, result)
        except RuntimeError:
            pass  # the loop is closed: the worker is gone, nobody to tell

    def _run(self) -> None:
        running = True
        while running:
            try:
                self.engine.check_health()  # a dead tensor-parallel rank: fatal, even idle
                commands = self._next_commands()
                rejected: list[tuple[str, str]] = []
                running = self._apply(commands, rejected)
                outputs: list[RequestOutput] = []
                step_time = 0.0
                if running and self.engine.has_unfinished_requests():
                    t0 = time.perf_counter()
                    outputs = self.engine.step()
                    step_time = time.perf_counter() - t0
                if commands or outputs:
                    stored, evicted = self.engine.block_manager.drain_kv_changes()
                    self._post(
                        StepResult(
                            outputs=outputs,
                            stats=self.engine.stats(),
                            admit_slots=admit_slots(self.engine),
                            adds_applied=self._adds_applied,
                            step_time_s=step_time,
                            rejected=rejected,
                            kv_stored=stored,
                            kv_evicted=evicted,
                        )
                    )
            except Exception as e:  # a bug or device failure: report it, stop stepping
                self._post(
                    StepResult(
                        outputs=[],
                        stats=self.engine.stats(),
                        admit_slots=0,
                        adds_applied=self._adds_applied,
                        fatal=f"{_root_cause(self.engine)}{type(e).__name__}: {e}\n"
                        f"{traceback.format_exc()}",
                    )
                )
                return


def _root_cause(engine: LLMEngine) -> str:
    """A dead tensor-parallel rank behind a failed step, named first ('' if none): the
    collective's own error only says a peer went away."""
    try:
        engine.check_health(wait_s=RANK_REAP_WAIT_S)
    except Exception as e:
        return f"{e}; "
    return ""
