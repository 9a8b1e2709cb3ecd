"""The worker turns the engine's speculation totals into vLLM-style spec_decode_* counters."""

from __future__ import annotations

from engine_worker.engine.speculative.counters import SpecCounters
from engine_worker.worker.step_results import count_speculation
from shared.metrics import new_registry, worker_metrics


def _value(registry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"model_name": "m", **labels}) or 0.0


def test_counters_follow_engine_totals() -> None:
    registry = new_registry()
    metrics = worker_metrics(registry)
    first = SpecCounters()
    first.record(4, 3)
    count_speculation(None, first, metrics, "m")
    second = first.copy()
    second.record(4, 0)
    second.record(2, 2)
    count_speculation(first, second, metrics, "m")
    count_speculation(second, second, metrics, "m")  # a step without speculation
    assert _value(registry, "jetserve:spec_decode_num_drafts_total") == 3
    assert _value(registry, "jetserve:spec_decode_num_draft_tokens_total") == 10
    assert _value(registry, "jetserve:spec_decode_num_accepted_tokens_total") == 5
    per_pos = [
        _value(registry, "jetserve:spec_decode_num_accepted_tokens_per_pos_total", position=p)
        for p in "0123"
    ]
    assert per_pos == [2, 2, 1, 0]
