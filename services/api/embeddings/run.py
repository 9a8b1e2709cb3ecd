"""Embedding requests, for both dialects: inputs -> Jobs -> pooled vectors.

An embedding is a Job like any other (one per input, so a batch spreads over the
engine's continuous batches beside generation), whose sampling asks for `pooling`
instead of tokens: the worker prefills the prompt and returns the pooled final hidden
state on the job's last Delta. Going through `ApiState.start_generation` gives it the
gateway (keys, limits, metering) and the same queue as generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.api.errors import bad_request, internal_error
from services.api.jobs.builder import INT32_LIMIT, PreparedRequest
from services.api.jobs.client import JobFailed
from services.api.model_registry import ServedModel
from services.api.state import ApiState
from shared.sampling_params import POOLING, SamplingParams

MAX_INPUTS = 2048
DEFAULT_POOLING = "last"  # what decoder embedding models (e5-mistral, Qwen3-Embedding) use


@dataclass
class EmbedResult:
    vectors: list[list[float]]
    prompt_tokens: int
    duration_s: float


def check_pooling(pooling: str | None) -> str:
    pooling = pooling or DEFAULT_POOLING
    if pooling not in POOLING:
        raise bad_request(f"pooling must be one of {list(POOLING)}", param="pooling")
    return pooling


def embedding_prompts(
    inputs: list[list[int]], model: ServedModel, truncate: bool, param: str = "input"
) -> list[list[int]]:
    """Validated token ids per input; too long ones cut to the context or refused."""
    if not inputs:
        raise bad_request(f"{param} must not be empty", param=param)
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request", param=param)
    # The engine keeps one position free after a prompt (it was built to generate).
    limit = (model.max_model_len or INT32_LIMIT) - 1
    vocab = model.tokenizer.vocab_size
    out = []
    for ids in inputs:
        if not ids:
            raise bad_request(f"{param} must not contain empty strings", param=param)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"{param} has a token id outside the vocabulary", param=param)
        if len(ids) > limit:
            if not truncate:
                raise bad_request(
                    f"the input has {len(ids)} tokens; this model's context allows {limit}",
                    param=param,
                    code="context_length_exceeded",
                )
            ids = ids[:limit]
        out.append(list(ids))
    return out


def prepare_embedding(
    prompts: list[list[int]], pooling: str | None, normalize: bool
) -> PreparedRequest:
    sampling = SamplingParams(
        max_tokens=1, temperature=0.0, pooling=check_pooling(pooling), normalize=normalize
    )
    return PreparedRequest(
        prompts=prompts,
        sampling=sampling,
        stop=[],
        skip_special_tokens=True,
        priority=0,
        max_tokens_explicit=False,
    )


def shorten(vector: list[float], dimensions: int | None, normalize: bool) -> list[float]:
    """Matryoshka-style `dimensions`: the first d values, renormalized when normalized."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    if not normalize:
        return head
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


def check_dimensions(dimensions: int | None) -> None:
    if dimensions is not None and dimensions < 1:
        raise bad_request("dimensions must be a positive integer", param="dimensions")


async def embed(
    st: ApiState, model: ServedModel, prepared: PreparedRequest, user: str | None
) -> EmbedResult:
    gen = await st.start_generation(model, prepared, user)
    try:
        async for _ in gen.events():
            pass
    except JobFailed as e:
        raise internal_error(f"embedding failed: {e}") from e
    finally:
        st.finish(gen)
    missing = [i for i in range(len(prepared.prompts)) if i not in gen.embeddings]
    if missing:
        raise internal_error(
            "the worker returned no embedding (it may predate embeddings); "
            f"inputs without one: {missing[:8]}"
        )
    t = gen.timing
    return EmbedResult(
        vectors=[gen.embeddings[i] for i in range(len(prepared.prompts))],
        prompt_tokens=gen.usage.prompt_tokens,
        duration_s=(t.end or t.start) - t.start,
    )
