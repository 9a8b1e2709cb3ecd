"""The output constraint travels inside the Job's sampling map, optional and versioned."""

from __future__ import annotations

import time

import msgpack
import pytest

from shared.messages import Job, MessageError, decode_job, encode_job
from shared.sampling_params import SamplingParams
from shared.structured_output import (
    StructuredOutput,
    build_grammar,
    choice_output,
    json_schema_output,
)


def job(structured: StructuredOutput | None) -> Job:
    return Job(
        id="j1",
        model="m",
        prompt_token_ids=[1, 2],
        sampling=SamplingParams(max_tokens=5, structured=structured),
        created_at=time.time(),
        reply_to="llm.events.j1",
    )


@pytest.mark.parametrize(
    "out",
    [
        None,
        json_schema_output({"type": "object", "properties": {"b": {}, "a": {}}}),
        StructuredOutput("json_object"),
        StructuredOutput("regex", "[a-z]+"),
        choice_output(["x", "y"]),
        StructuredOutput("grammar", 'root ::= "a"'),
    ],
)
def test_round_trip(out: StructuredOutput | None) -> None:
    assert decode_job(encode_job(job(out))).sampling.structured == out


def test_absent_field_reads_as_free_text_and_is_not_written_when_unset() -> None:
    raw = msgpack.unpackb(encode_job(job(None)))
    assert "structured" not in raw["sampling"]  # what a reader of the previous version saw


def test_a_reader_ignores_sampling_keys_it_does_not_know() -> None:
    raw = msgpack.unpackb(encode_job(job(StructuredOutput("regex", "a"))))
    raw["sampling"]["future_knob"] = 3
    assert decode_job(msgpack.packb(raw)).sampling.structured == StructuredOutput("regex", "a")


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "yaml", "spec": "x"},
        {"kind": "regex"},
        {"kind": 3, "spec": ""},
        "regex",
        {"kind": "regex", "spec": "x" * 70000},
    ],
)
def test_malformed_constraint_is_a_message_error(bad) -> None:
    raw = msgpack.unpackb(encode_job(job(None)))
    raw["sampling"]["structured"] = bad
    with pytest.raises(MessageError, match=r"sampling\.structured"):
        decode_job(msgpack.packb(raw))


def test_canonical_spec_keeps_property_order() -> None:
    a = json_schema_output({"type": "object", "properties": {"b": {}, "a": {}}})
    assert a.spec == '{"type":"object","properties":{"b":{},"a":{}}}'


def test_build_grammar_names_the_problem() -> None:
    pytest.importorskip("xgrammar")
    with pytest.raises(ValueError, match="invalid regex"):
        build_grammar(StructuredOutput("regex", "(ab"))
    with pytest.raises(ValueError, match="Unsupported type"):
        build_grammar(json_schema_output({"type": "nope"}))
    with pytest.raises(ValueError, match="non-empty"):
        build_grammar(StructuredOutput("choice", "[]"))
