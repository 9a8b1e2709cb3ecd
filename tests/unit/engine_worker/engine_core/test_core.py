"""The engine core's loop without any I/O: commands between steps, one result per step,
one fatal report when the engine raises, and an end when nobody listens."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_worker.engine.config import EngineConfig
from engine_worker.engine.simulated.engine import SimulatedEngine
from engine_worker.engine_core.core import EngineCore, admit_slots, engine_info
from engine_worker.engine_core.messages import AbortRequest, AddRequest, Command, StepResult, Stop
from shared.sampling_params import SamplingParams


class Scripted:
    """Hands out the given command batches, then Stop once the engine is idle."""

    def __init__(self, *batches: list[Command]) -> None:
        self.batches = list(batches)
        self.waits: list[float] = []

    def get(self, wait_s: float) -> list[Command]:
        self.waits.append(wait_s)
        if self.batches:
            return self.batches.pop(0)
        return [Stop()] if wait_s > 0 else []


class FailingEngine(SimulatedEngine):
    def __init__(self, config: EngineConfig, fail_at_step: int) -> None:
        super().__init__(config)
        self.steps, self.fail_at_step = 0, fail_at_step

    def step(self):  # type: ignore[override]
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("device fell off the bus")
        return super().step()


def _config(model: Path) -> EngineConfig:
    return EngineConfig(
        model=str(model),
        load_format="simulated",
        simulate_profile="h100-llama3-8b",
        max_num_seqs=4,
        num_kv_blocks=64,
    )


@pytest.fixture
def engine(tiny_llama: Path) -> SimulatedEngine:
    return SimulatedEngine(_config(tiny_llama))


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_runs_requests_to_the_end_and_reports_each_step(engine: SimulatedEngine) -> None:
    results: list[StepResult] = []
    source = Scripted(
        [
            AddRequest("a", [1, 5, 6], _params(5)),
            AddRequest("bad", [1, 10**7], _params(5)),
            AddRequest("b", [1, 7], _params(3)),
        ],
        [],
        [AbortRequest("b")],
    )
    core = EngineCore(engine, source, lambda r: results.append(r) or True, idle_wait_s=0.01)
    core.run()
    assert not core.failed
    assert results[0].rejected and results[0].rejected[0][0] == "bad"
    assert all(r.adds_applied == 3 for r in results)
    tokens: dict[str, int] = {}
    finished: dict[str, str | None] = {}
    for r in results:
        for out in r.outputs:
            tokens[out.request_id] = tokens.get(out.request_id, 0) + len(out.deltas[0].token_ids)
            if out.finished:
                finished[out.request_id] = out.deltas[0].finish_reason
    assert tokens["a"] == 5 and finished["a"] == "length"
    assert finished["b"] == "abort" and tokens["b"] < 3  # aborted after its second step
    assert results[-1].stats.num_running == 0 and results[-1].admit_slots == 4
    assert source.waits[0] > 0 and 0.0 in source.waits  # waits only while idle
    assert all(r.step_time_s > 0 for r in results if r.outputs)


def test_an_engine_exception_is_reported_once_and_ends_the_loop(tiny_llama: Path) -> None:
    engine = FailingEngine(_config(tiny_llama), fail_at_step=3)
    results: list[StepResult] = []
    source = Scripted([AddRequest("a", [1, 5, 6], _params(50))])
    core = EngineCore(engine, source, lambda r: results.append(r) or True)
    core.run()
    assert core.failed
    assert [r.fatal is not None for r in results] == [False, False, True]
    assert "RuntimeError: device fell off the bus" in (results[-1].fatal or "")
    assert results[-1].admit_slots == 0 and results[-1].adds_applied == 1


def test_a_sink_nobody_reads_ends_the_loop(engine: SimulatedEngine) -> None:
    posted: list[StepResult] = []
    source = Scripted([AddRequest("a", [1, 5, 6], _params(50))])
    EngineCore(engine, source, lambda r: posted.append(r) and False).run()
    assert len(posted) == 1


def test_engine_info_is_what_the_worker_registers(engine: SimulatedEngine) -> None:
    info = engine_info(engine)
    assert info.max_model_len == engine.max_model_len
    assert info.facts.num_parameters == engine.num_parameters
    assert info.snapshot.admit_slots == admit_slots(engine) == 4
    assert info.snapshot.stats.num_total_blocks == 64 and info.snapshot.adds_applied == 0
