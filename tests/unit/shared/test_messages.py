"""Wire format: msgpack round trips, and every kind of malformed input raises MessageError."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bus.subjects import (
    cancel_subject,
    consumer_name,
    events_subject,
    jobs_subject,
    sanitize_model,
    worker_key,
)
from shared.messages import (
    CompletionChunk,
    Delta,
    Job,
    MessageError,
    SamplingParams,
    Usage,
    decode_delta,
    decode_job,
    encode_delta,
    encode_job,
)

token_ids = st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=50)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
short_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
ident = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=30)

samplings = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 4096),
    temperature=finite,
    top_p=finite,
    top_k=st.integers(-1, 1000),
    min_p=finite,
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    presence_penalty=finite,
    frequency_penalty=finite,
    repetition_penalty=finite,
    logprobs=st.none() | st.integers(0, 20),
    stop_token_ids=token_ids,
    ignore_eos=st.booleans(),
    n=st.integers(1, 8),
    speculative=st.booleans(),
)
jobs = st.builds(
    Job,
    id=ident,
    model=short_text,
    prompt_token_ids=token_ids,
    sampling=samplings,
    created_at=finite,
    reply_to=short_text,
    priority=st.integers(-100, 100),
    deadline=st.none() | finite,
    tags=st.dictionaries(short_text, short_text, max_size=4),
)
logprob_entries = st.tuples(
    st.integers(0, 2**31 - 1),
    finite,
    st.lists(st.tuples(st.integers(0, 2**31 - 1), finite), max_size=5),
)
chunks = st.builds(
    CompletionChunk,
    index=st.integers(0, 16),
    token_ids=token_ids,
    logprobs=st.none() | st.lists(logprob_entries, max_size=5),
    finish_reason=st.sampled_from([None, "stop", "length", "abort", "error"]),
)
deltas = st.builds(
    Delta,
    job_id=ident,
    seq=st.integers(0, 2**31),
    chunks=st.lists(chunks, max_size=4),
    finished=st.booleans(),
    usage=st.none()
    | st.builds(
        Usage, st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), finite, finite
    ),
    error=st.none() | short_text,
    worker_id=short_text,
)


@settings(max_examples=200, deadline=None)
@given(jobs)
def test_job_round_trip(job: Job) -> None:
    assert decode_job(encode_job(job)) == job


@settings(max_examples=200, deadline=None)
@given(deltas)
def test_delta_round_trip(delta: Delta) -> None:
    assert decode_delta(encode_delta(delta)) == delta


def _job() -> Job:
    return Job(
        id="cmpl-1",
        model="tiny",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4, temperature=0.0, seed=7, stop_token_ids=[2]),
        created_at=1700000000.5,
        reply_to=events_subject("cmpl-1"),
        tags={"key_id": "k1"},
    )


def test_job_sampling_is_the_engine_s_sampling_params() -> None:
    """One dataclass on both sides of the bus: what decodes is what the engine validates."""
    params = decode_job(encode_job(_job())).sampling
    assert isinstance(params, SamplingParams)
    params.validate()
    assert params.seed == 7 and params.stop_token_ids == [2]


def test_defaults_fill_missing_optional_fields() -> None:
    wire = {
        "v": 1,
        "id": "a",
        "model": "m",
        "prompt_token_ids": [5],
        "sampling": {},
        "created_at": 1,
        "reply_to": "llm.events.a",
    }
    job = decode_job(msgpack.packb(wire))
    assert job.sampling == SamplingParams()
    assert job.priority == 0 and job.deadline is None and job.tags == {}
    assert isinstance(job.created_at, float)


def test_unknown_extra_fields_are_ignored() -> None:
    raw = msgpack.unpackb(encode_job(_job()))
    raw["future_field"] = {"x": 1}
    assert decode_job(msgpack.packb(raw)) == _job()


def _mutated(**changes) -> bytes:
    raw = msgpack.unpackb(encode_job(_job()))
    for key, value in changes.items():
        if value is KeyError:
            del raw[key]
        else:
            raw[key] = value
    return msgpack.packb(raw)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated array
        b"{not msgpack json}",
        msgpack.packb([1, 2, 3]),
        msgpack.packb("a string"),
        msgpack.packb({1: 2}),
        _mutated(v=2),
        _mutated(v=KeyError),
        _mutated(v="1"),
        _mutated(id=KeyError),
        _mutated(id=""),
        _mutated(id="a.b"),
        _mutated(id="x*"),
        _mutated(id=5),
        _mutated(model=None),
        _mutated(prompt_token_ids="1 2 3"),
        _mutated(prompt_token_ids=[1, "2"]),
        _mutated(prompt_token_ids=[1, 2.0]),
        _mutated(prompt_token_ids=[True]),
        _mutated(sampling=[1]),
        _mutated(sampling={"max_tokens": "16"}),
        _mutated(sampling={"temperature": "hot"}),
        _mutated(sampling={"ignore_eos": 1}),
        _mutated(sampling={"stop_token_ids": [None]}),
        _mutated(sampling={"seed": 1.5}),
        _mutated(created_at="now"),
        _mutated(created_at=KeyError),
        _mutated(priority=True),
        _mutated(tags=["a"]),
        _mutated(tags={"a": 1}),
        _mutated(reply_to=KeyError),
    ],
)
def test_malformed_job_raises_message_error(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode_job(data)


def test_message_error_is_a_value_error() -> None:
    assert issubclass(MessageError, ValueError)
    with pytest.raises(ValueError):
        decode_job(b"\x00")
    with pytest.raises(MessageError):
        decode_job("not bytes")  # type: ignore[arg-type]


def _delta_wire(**changes) -> bytes:
    d = Delta(job_id="j", seq=0, chunks=[CompletionChunk(0, [1], [(1, -0.5, [(2, -1.0)])])])
    raw = msgpack.unpackb(encode_delta(d))
    raw.update(changes)
    return msgpack.packb(raw)


@pytest.mark.parametrize(
    "data",
    [
        _delta_wire(v=0),
        _delta_wire(seq=-1),
        _delta_wire(seq="0"),
        _delta_wire(job_id=None),
        _delta_wire(chunks={}),
        _delta_wire(chunks=[{"index": 0}]),
        _delta_wire(chunks=[{"index": 0, "token_ids": [1], "finish_reason": "done"}]),
        _delta_wire(chunks=[{"index": 0, "token_ids": [1], "logprobs": [[1, -0.1]]}]),
        _delta_wire(chunks=[{"index": 0, "token_ids": [1], "logprobs": [[1, "x", []]]}]),
        _delta_wire(chunks=[{"index": 0, "token_ids": [1], "logprobs": [[1, 0.0, [[1]]]]}]),
        _delta_wire(finished="yes"),
        _delta_wire(usage={"prompt_tokens": 1}),
        _delta_wire(error=3),
    ],
)
def test_malformed_delta_raises_message_error(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode_delta(data)


def test_delta_logprobs_are_tuples_after_decode() -> None:
    d = decode_delta(_delta_wire())
    assert d.chunks[0].logprobs == [(1, -0.5, [(2, -1.0)])]
    assert math.isclose(d.chunks[0].logprobs[0][1], -0.5)


def test_subject_names() -> None:
    assert sanitize_model("org/Model-1.5B v2") == "org_Model-1_5B_v2"
    assert jobs_subject("a.b*c>") == "llm.jobs.a_b_c_"
    assert consumer_name("tiny.llama") == "workers-tiny_llama"
    assert events_subject("cmpl-1") == "llm.events.cmpl-1"
    assert cancel_subject("cmpl-1") == "llm.cancel.cmpl-1"
    assert worker_key("m.x", "w-1") == "m_x.w-1"
    for bad in ("", "a.b", "a*", "a b"):
        with pytest.raises(ValueError):
            events_subject(bad)
    with pytest.raises(ValueError):
        sanitize_model("")
