"""Hypothesis on the request models: any JSON body either becomes a Job a worker accepts,
or is refused with a 4xx in OpenAI's format. Never an exception that would be a 5xx.

In-process and fast: the same functions the handlers run (strict parse, preparation with
a real tokenizer, the gateway's admission with per-key caps), then the Job goes through
the wire codec and the engine's own SamplingParams validation, exactly as a worker would
see it. A request the API accepts but a worker rejects would reach the client as a 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.errors import APIError
from services.api.gateway.admission import Caller, Gateway, _caller
from services.api.gateway.keys import ApiKeyRecord, KeyLimits, hash_secret
from services.api.jobs.builder import PreparedRequest, prepare_chat, prepare_completion
from services.api.model_registry import ServedModel, tokenizer_max_len
from services.api.openai.schemas import ChatCompletionRequest, CompletionRequest
from services.api.request_body import parse_body
from services.api.streaming.token_text import TokenTexts
from shared.messages import Job, decode_job, encode_job
from shared.metrics import new_registry
from shared.sampling_params import SamplingParams
from shared.settings import GatewaySettings
from shared.tokenizer import load_tokenizer

EXAMPLES = 500

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
edge_ints = st.sampled_from([-(2**70), -(2**63), -(2**31), -1, 0, 2**31, 2**63, 2**64, 2**70])
edge_floats = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-320, 1e308])
text = st.text(max_size=24)
nonblank = text.filter(lambda t: t.strip() != "")
token_ids = st.lists(st.integers(0, 399), min_size=1, max_size=6)


def opt(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return strategy | st.none()


# Sensible values for every field; `request_objects` then breaks 0-2 of them.
SAMPLING_FIELDS: dict[str, st.SearchStrategy] = {
    "max_tokens": opt(st.integers(1, 32)),
    "temperature": opt(st.floats(0, 2)),
    "top_p": opt(st.floats(0.01, 1)),
    "n": opt(st.integers(1, 3)),
    "stream": st.booleans(),
    "stop": opt(nonblank | st.lists(nonblank, max_size=3)),
    "seed": opt(st.integers(0, 2**40)),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "user": text,
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 399), max_size=3),
    "priority": st.integers(-5, 200),
    "speculative_decoding": opt(st.booleans()),
}
FIELDS = {
    "completion": {
        **SAMPLING_FIELDS,
        "logprobs": opt(st.integers(0, 5)),
        "echo": st.just(False),
    },
    "chat": {
        **SAMPLING_FIELDS,
        "max_completion_tokens": opt(st.integers(1, 32)),
        "logprobs": opt(st.booleans()),
        "add_generation_prompt": st.booleans(),
    },
}
content = opt(text) | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"])},
    optional={"content": content},
)
REQUIRED = {
    "completion": {
        "model": st.just("tiny"),
        "prompt": nonblank | st.lists(nonblank, min_size=1, max_size=2) | token_ids,
    },
    "chat": {
        "model": st.just("tiny"),
        "messages": st.lists(message, min_size=1, max_size=3),
    },
}
# What replaces a field: mostly values of a plausible type at the edges of its range
# (they pass the parser and test the semantic checks), sometimes any JSON at all.
BAD = st.one_of(
    edge_ints,
    edge_floats,
    edge_floats,
    st.lists(edge_ints, min_size=1, max_size=3),
    anything,
)


@st.composite
def request_objects(draw: st.DrawFn, kind: str) -> dict:
    obj = draw(st.fixed_dictionaries(REQUIRED[kind], optional=FIELDS[kind]))
    names = sorted({*REQUIRED[kind], *FIELDS[kind], "logit_bias", "best_of", "top_logprobs"})
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        obj[draw(st.sampled_from(names))] = draw(BAD)
    return obj


def bodies(kind: str) -> st.SearchStrategy[bytes]:
    """Mostly JSON objects with 0-2 broken fields; sometimes raw bytes or any JSON value."""
    as_json = request_objects(kind).map(lambda d: json.dumps(d, allow_nan=True).encode())
    other = anything.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40)
    return st.one_of(as_json, as_json, as_json, as_json, other)


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> ServedModel:
    bundle = load_tokenizer(tiny_llama)
    return ServedModel(
        "tiny", bundle, TokenTexts(bundle.tokenizer), tokenizer_max_len(bundle) or 512
    )


@pytest.fixture
def gateway() -> Gateway:
    """One per test: each property runs on its own event loop."""
    return Gateway.create(GatewaySettings(auth=True), new_registry())


CAPPED_KEY = ApiKeyRecord(
    id="key_capped",
    name="capped",
    secret_sha256=hash_secret("x" * 32),
    limits=KeyLimits(max_tokens=8, max_prompt_tokens=64),
    priority_class="batch",
)


def assert_client_error(e: APIError) -> None:
    assert 400 <= e.status < 500, e
    body = e.body()["error"]
    assert body["message"] and body["type"]


def check_worker_accepts(prepared: PreparedRequest, vocab: int) -> None:
    """What a worker does with the Job: decode it, build SamplingParams, validate."""
    for prompt in prepared.prompts:
        job = Job(
            id="fuzz",
            model="tiny",
            prompt_token_ids=prompt,
            sampling=prepared.sampling,
            created_at=0.0,
            reply_to="llm.events.fuzz",
            priority=prepared.priority,
            tags={"key_id": "k"},
        )
        decoded = decode_job(encode_job(job))
        params = SamplingParams(**dataclasses.asdict(decoded.sampling))
        params.validate()
        assert all(math.isfinite(v) for v in (
            params.temperature, params.top_p, params.min_p, params.presence_penalty,
            params.frequency_penalty, params.repetition_penalty,
        ))  # fmt: skip
        assert prompt and all(0 <= t < vocab for t in prompt)


async def run_request(
    body: bytes, kind: str, served: ServedModel, gateway: Gateway, capped: bool
) -> bool:
    """One body through the handler's path; whether it became a Job (else a 4xx)."""
    token = _caller.set(Caller(key=CAPPED_KEY if capped else None, feature="fuzz"))
    try:
        if kind == "completion":
            prepared = prepare_completion(parse_body(CompletionRequest, body), served)
        else:
            prepared = prepare_chat(parse_body(ChatCompletionRequest, body), served)
        admission = await gateway.admit(served, prepared, None)
    except APIError as e:
        assert_client_error(e)
        return False
    finally:
        _caller.reset(token)
    # The request never runs here: give back the open streams it holds, as its end would.
    gateway.streams.release(admission.caller.key_id, admission.streams)
    check_worker_accepts(admission.prepared, served.tokenizer.vocab_size)
    if capped:
        assert admission.prepared.sampling.max_tokens <= 8
        assert admission.prepared.priority >= 100
    return True


def run_property(kind: str, served: ServedModel, gateway: Gateway) -> dict[str, int]:
    """Hypothesis over EXAMPLES bodies of `kind`; how many ran and how many became Jobs.

    The counts belong to this run, so the test that asks for them checks them itself
    (they used to be a module global read by a separate test, which failed when run
    alone or before the properties). One event loop serves every example.
    """
    counts = {"cases": 0, "accepted": 0}
    with asyncio.Runner() as runner:

        def body_is_a_job_or_4xx(body: bytes, capped: bool) -> None:
            counts["cases"] += 1
            counts["accepted"] += runner.run(run_request(body, kind, served, gateway, capped))

        # Its own name per kind, so hypothesis keeps each kind's examples apart.
        body_is_a_job_or_4xx.__name__ = body_is_a_job_or_4xx.__qualname__ = f"{kind}_body"
        settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        )(given(body=bodies(kind), capped=st.booleans())(body_is_a_job_or_4xx))()
    print(f"hypothesis {kind} request-model cases: {counts}")  # shown with -s
    return counts


def assert_counts(counts: dict[str, int]) -> None:
    assert counts["cases"] >= EXAMPLES
    # The strategies must reach the worker-side checks often, not only the 4xx paths.
    assert counts["accepted"] >= EXAMPLES // 10


def test_completion_bodies_are_jobs_or_4xx(served: ServedModel, gateway: Gateway) -> None:
    assert_counts(run_property("completion", served, gateway))


def test_chat_bodies_are_jobs_or_4xx(served: ServedModel, gateway: Gateway) -> None:
    assert_counts(run_property("chat", served, gateway))
