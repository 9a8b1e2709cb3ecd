"""One engine step's outputs as the Deltas to publish, with the token, success and
speculative decoding counters."""

from __future__ import annotations

from engine_worker.engine.speculative.counters import SpecCounters
from engine_worker.engine_core.messages import StepResult
from engine_worker.worker.job_state import delta_from_output
from engine_worker.worker.outbox import Outgoing
from engine_worker.worker.running import RunningJobs
from shared.metrics import WorkerMetrics


def step_deltas(
    result: StepResult,
    jobs: RunningJobs,
    metrics: WorkerMetrics,
    model_name: str,
    worker_id: str,
    stream_interval: int = 1,
) -> list[Outgoing]:
    """A Delta per current job in `result` (a finished one acks its message), or none for
    a job whose tokens wait for its stream interval; the step's time is shared equally
    among its jobs as their GPU time."""
    batch: list[Outgoing] = []
    share = result.step_time_s / max(len(result.outputs), 1)
    m = metrics
    step_tokens = 0  # counted once per step: a labelled child looked up per Delta costs more
    for out in result.outputs:
        state = jobs.state_of(out.request_id)
        if state is None or state.finished:
            continue  # handed back during shutdown, lost, or closed already
        state.gpu_time_s += share
        if not state.prompt_counted:
            state.prompt_counted = True
            m.prompt_tokens.labels(model_name=model_name).inc(out.num_prompt_tokens)
        delta = delta_from_output(state, out, worker_id, stream_interval)
        if delta is None:
            continue
        for c in delta.chunks:
            step_tokens += len(c.token_ids)
        action = None
        if delta.finished:
            action = "ack"
            reasons = [c.finish_reason for c in delta.chunks if c.finish_reason]
            m.request_success.labels(
                model_name=model_name, finished_reason=reasons[0] if reasons else "stop"
            ).inc()
        batch.append(Outgoing(state, delta, action))
    if step_tokens:
        m.generation_tokens.labels(model_name=model_name).inc(step_tokens)
    return batch


def count_speculation(
    before: SpecCounters | None, now: SpecCounters, metrics: WorkerMetrics, model_name: str
) -> None:
    """Advance the spec_decode_* counters by what the engine's totals grew since `before`."""
    before = before or SpecCounters()
    m, name = metrics, model_name
    grown = now.num_drafts - before.num_drafts
    if grown <= 0:
        return
    m.spec_decode_num_drafts.labels(model_name=name).inc(grown)
    m.spec_decode_num_draft_tokens.labels(model_name=name).inc(
        now.num_draft_tokens - before.num_draft_tokens
    )
    m.spec_decode_num_accepted_tokens.labels(model_name=name).inc(
        now.num_accepted_tokens - before.num_accepted_tokens
    )
    for pos, total in enumerate(now.accepted_per_pos):
        prev = before.accepted_per_pos[pos] if pos < len(before.accepted_per_pos) else 0
        if total > prev:
            m.spec_decode_num_accepted_tokens_per_pos.labels(
                model_name=name, position=str(pos)
            ).inc(total - prev)
