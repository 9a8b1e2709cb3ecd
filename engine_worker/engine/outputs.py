"""What one engine step hands back: new tokens per request, not per token, and the
engine's state after it. Plain data, no torch: the worker reads these without loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_worker.engine.speculative.counters import SpecCounters


@dataclass
class TokenLogprob:
    """The sampled token's logprob and the top alternatives (token_id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionDelta:
    """New tokens of one of a request's n completions since the previous step."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_token_id: int | None = None


@dataclass
class RequestOutput:
    """Per-step output of a request; `finished` once every completion has a finish_reason."""

    request_id: str
    deltas: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    embedding: list[float] | None = None  # an embedding request's pooled vector, when done


@dataclass
class EngineStats:
    """The scheduler's and cache's state after a step (gauges, the registry, admission)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_preemptions: int
    spec: SpecCounters = field(default_factory=SpecCounters)  # speculative decoding so far
