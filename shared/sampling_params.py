"""Per-request sampling parameters, validated once at the engine's edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.structured_output import StructuredOutput

GREEDY_EPS = 1e-5
POOLING = ("last", "mean")


@dataclass
class SamplingParams:
    """What a request asks of the sampler; mirrors the OpenAI/vLLM knobs."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # None: no logprobs; 0: only the sampled token's logprob; k: plus the top-k alternatives.
    logprobs: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    # Output constraint (JSON schema, regex, choice, grammar); None: free text.
    structured: StructuredOutput | None = None
    # An embedding request: prefill only, the hidden states pooled ("last" token or "mean")
    # instead of sampled; None: generate text.
    pooling: str | None = None
    normalize: bool = True  # L2-normalize the pooled vector
    # False: never speculate for this request, even where the server does (a per-request
    # opt-out; outputs are the same either way, only the cost per token differs).
    speculative: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.pooling is not None:
            if self.pooling not in POOLING:
                raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
            if self.n != 1 or self.structured is not None or self.logprobs is not None:
                raise ValueError("an embedding request takes n=1, no logprobs, no constraint")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        if self.structured is not None:
            self.structured.validate()
