"""The engine link's codec: every message round-trips exactly, and nothing is left out.

A field added to a message class without the codec carrying it would be silently lost
between the engine process and the worker; the field lists below fail first.
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine.outputs import (
    CompletionDelta,
    EngineStats,
    RequestOutput,
    TokenLogprob,
)
from engine_worker.engine.speculative.counters import SpecCounters
from engine_worker.engine_core import codec
from engine_worker.engine_core.messages import (
    AbortRequest,
    AddRequest,
    EngineInfo,
    StepResult,
    Stop,
)
from engine_worker.worker.model_facts import ModelFacts
from shared.sampling_params import SamplingParams
from shared.structured_output import KINDS, StructuredOutput

ids = st.integers(min_value=0, max_value=2**31 - 1)
floats = st.floats(allow_nan=False)
text = st.text(max_size=20)
small = st.integers(min_value=0, max_value=10**6)

logprobs = st.builds(TokenLogprob, ids, floats, st.lists(st.tuples(ids, floats), max_size=3))
deltas = st.builds(
    CompletionDelta,
    index=st.integers(0, 7),
    token_ids=st.lists(ids, max_size=5),
    logprobs=st.none() | st.lists(logprobs, max_size=3),
    finish_reason=st.sampled_from([None, "stop", "length", "abort", "error"]),
    stop_token_id=st.none() | ids,
)
outputs = st.builds(
    RequestOutput,
    request_id=text,
    deltas=st.lists(deltas, max_size=3),
    finished=st.booleans(),
    num_prompt_tokens=small,
    num_cached_tokens=small,
    embedding=st.none() | st.lists(floats, max_size=8),
)
spec = st.builds(SpecCounters, small, small, small, st.lists(small, max_size=4))
stats = st.builds(EngineStats, small, small, small, small, floats, floats, small, spec)
steps = st.builds(
    StepResult,
    outputs=st.lists(outputs, max_size=6),
    stats=stats,
    admit_slots=small,
    adds_applied=small,
    step_time_s=floats,
    rejected=st.lists(st.tuples(text, text), max_size=3),
    fatal=st.none() | text,
    kv_stored=st.lists(st.binary(min_size=16, max_size=16), max_size=4),
    kv_evicted=st.lists(st.binary(min_size=16, max_size=16), max_size=4),
)
sampling = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 4096),
    temperature=floats,
    top_p=floats,
    top_k=st.integers(-1, 100),
    min_p=floats,
    seed=st.none() | st.integers(0, 2**63 - 1),
    presence_penalty=floats,
    frequency_penalty=floats,
    repetition_penalty=floats,
    logprobs=st.none() | st.integers(0, 20),
    stop_token_ids=st.lists(ids, max_size=4),
    ignore_eos=st.booleans(),
    n=st.integers(1, 4),
    structured=st.none() | st.builds(StructuredOutput, st.sampled_from(KINDS), text),
    pooling=st.sampled_from([None, "last", "mean"]),
    normalize=st.booleans(),
    speculative=st.booleans(),
)
adds = st.builds(
    AddRequest,
    request_id=text,
    prompt_token_ids=st.lists(ids, min_size=1, max_size=8),
    params=sampling,
    priority=st.integers(-100, 100),
    resume_token_ids=st.none() | st.lists(st.lists(ids, max_size=4), max_size=3),
)
commands = st.lists(adds | st.builds(AbortRequest, text) | st.just(Stop()), max_size=8)
facts = st.builds(ModelFacts, text, small, text, small, text)


@settings(max_examples=100, deadline=None)
@given(steps)
def test_step_results_round_trip(result: StepResult) -> None:
    assert codec.decode(codec.encode_step(result)) == result


@settings(max_examples=100, deadline=None)
@given(commands)
def test_command_batches_round_trip(batch: list) -> None:
    assert codec.decode(codec.encode_commands(batch)) == batch


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 10**6), facts, steps)
def test_engine_info_round_trips(max_model_len: int, f: ModelFacts, snapshot: StepResult) -> None:
    info = EngineInfo(max_model_len, 16, f, snapshot)
    assert codec.decode(codec.encode_info(info)) == info


def test_init_settings_round_trip() -> None:
    settings_ = {"engine": {"model": "/m", "max_num_seqs": 4}, "extra_eos_token_ids": [2]}
    assert codec.decode(codec.encode_init(settings_)) == settings_


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_codec_carries_every_field() -> None:
    """Extend codec.py (and the strategies above) when one of these lists changes."""
    assert _names(StepResult) == {
        "outputs", "stats", "admit_slots", "adds_applied", "step_time_s", "rejected", "fatal",
        "kv_stored", "kv_evicted",
    }  # fmt: skip
    assert _names(RequestOutput) == {
        "request_id", "deltas", "finished", "num_prompt_tokens", "num_cached_tokens", "embedding",
    }  # fmt: skip
    assert _names(CompletionDelta) == {
        "index", "token_ids", "logprobs", "finish_reason", "stop_token_id",
    }  # fmt: skip
    assert _names(TokenLogprob) == {"token_id", "logprob", "top"}
    assert _names(AddRequest) == {
        "request_id", "prompt_token_ids", "params", "priority", "resume_token_ids",
    }  # fmt: skip
    assert _names(EngineInfo) == {"max_model_len", "block_size", "facts", "snapshot"}
    assert _names(SpecCounters) == {
        "num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos",
    }  # fmt: skip
    # SamplingParams, EngineStats and ModelFacts travel field by field in declared order;
    # a new field must be msgpack-able (or be special-cased like `structured`).
    assert codec.SAMPLING_FIELDS == tuple(f.name for f in dataclasses.fields(SamplingParams))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", msgpack.packb(7), msgpack.packb([99, []]), msgpack.packb([codec.STEP, [1]])],
)
def test_garbage_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(data)
