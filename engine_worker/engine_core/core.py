"""The loop that owns an engine: commands in between steps, one StepResult out per step.

`LLMEngine.step()` is blocking CPU/GPU work and the engine is not thread-safe, so one
loop owns it and is the only caller of its methods. It takes commands from a
`CommandSource` (a queue in a thread, a socket in a child process), applies them
between steps, waits only when the engine has nothing to do, and hands each step's
outputs to a `Sink`. No I/O of its own: the thread and the process wrap it with theirs.
An exception in the engine (or a dead tensor-parallel rank, checked every turn, idle or
not) is reported once as a fatal StepResult and ends the loop; the loop's end closes the
engine (its other tensor-parallel ranks exit).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from engine_worker.engine.outputs import EngineStats, RequestOutput
from engine_worker.engine_core.messages import (
    AbortRequest,
    Command,
    EngineInfo,
    StepResult,
    Stop,
)
from engine_worker.worker.model_facts import model_facts

if TYPE_CHECKING:
    from engine_worker.engine.llm_engine import LLMEngine


class CommandSource(Protocol):
    def get(self, wait_s: float) -> list[Command]:
        """The commands waiting now; with none waiting, wait up to `wait_s` for the first."""
        ...


# Takes a step's result; False when nobody listens any more (the worker is gone).
Sink = Callable[[StepResult], bool]

RANK_REAP_WAIT_S = 2.0  # how long a failed step waits to learn whether a rank died


def admit_slots(engine: LLMEngine) -> int:
    """New requests the engine can start right now without queueing inside it."""
    if not engine.can_admit(1):
        return 0
    stats = engine.stats()
    return max(engine.config.max_num_seqs - stats.num_running - stats.num_waiting, 0)


def engine_info(engine: LLMEngine) -> EngineInfo:
    """The facts the worker registers and its first snapshot, read from a built engine."""
    snapshot = StepResult([], engine.stats(), admit_slots(engine), 0)
    block_size = engine.block_manager.block_size
    return EngineInfo(engine.max_model_len, block_size, model_facts(engine), snapshot)


class EngineCore:
    def __init__(
        self,
        engine: LLMEngine,
        commands: CommandSource,
        post: Sink,
        idle_wait_s: float = 0.5,
    ) -> None:
        self.engine = engine
        self._commands = commands
        self._post = post
        self._idle_wait_s = idle_wait_s
        self.adds_applied = 0
        self.failed = False  # the engine raised and the loop ended

    def _apply(self, commands: list[Command], rejected: list[tuple[str, str]]) -> bool:
        """Apply commands in order; False once a stop was requested."""
        for cmd in commands:
            if isinstance(cmd, Stop):
                return False
            if isinstance(cmd, AbortRequest):
                self.engine.abort_request(cmd.request_id)
                continue
            self.adds_applied += 1
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

    def run(self) -> None:
        """Until a Stop, an engine failure, or a sink nobody reads; then close the engine."""
        try:
            self._loop()
        finally:
            try:
                self.engine.close()
            except Exception:  # nothing more to report to: the loop has ended
                traceback.print_exc()

    def _loop(self) -> None:
        engine = self.engine
        running = True
        while running:
            try:
                engine.check_health()  # a dead tensor-parallel rank: fatal, even idle
                # Block briefly only when the engine has nothing to do.
                wait = 0.0 if engine.has_unfinished_requests() else self._idle_wait_s
                commands = self._commands.get(wait)
                rejected: list[tuple[str, str]] = []
                running = self._apply(commands, rejected)
                outputs: list[RequestOutput] = []
                step_time = 0.0
                if running and engine.has_unfinished_requests():
                    t0 = time.perf_counter()
                    outputs = engine.step()
                    step_time = time.perf_counter() - t0
                if commands or outputs:
                    stored, evicted = engine.block_manager.drain_kv_changes()
                    result = StepResult(
                        outputs=outputs,
                        stats=engine.stats(),
                        admit_slots=admit_slots(engine),
                        adds_applied=self.adds_applied,
                        step_time_s=step_time,
                        rejected=rejected,
                        kv_stored=stored,
                        kv_evicted=evicted,
                    )
                    if not self._post(result):
                        return
            except Exception as e:  # a bug or device failure: report it, stop stepping
                self.failed = True
                self._post(self._fatal(e))
                return

    def _fatal(self, e: Exception) -> StepResult:
        try:
            stats = self.engine.stats()
        except Exception:  # the engine is broken: report what is known
            stats = EngineStats(0, 0, 0, 0, 0.0, 0.0, 0)
        return StepResult(
            outputs=[],
            stats=stats,
            admit_slots=0,
            adds_applied=self.adds_applied,
            fatal=f"{_root_cause(self.engine)}{type(e).__name__}: {e}\n{traceback.format_exc()}",
        )


def _root_cause(engine: LLMEngine) -> str:
    """A dead tensor-parallel rank behind a failed step, named first ('' if none): the
    collective's own error only says a peer went away."""
    try:
        engine.check_health(wait_s=RANK_REAP_WAIT_S)
    except Exception as e:
        return f"{e}; "
    return ""
