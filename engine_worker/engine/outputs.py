"""What one engine step hands back: new tokens per request, not per token."""

from __future__ import annotations

from dataclasses import dataclass, field


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
