"""Structured outputs through the real stack (nats-server, worker, API) and the openai
client, on a tiny random Llama: only the grammar makes its output valid, so every check
here is the constraint's doing."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from tests.support.stack import Stack

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
    },
    "required": ["name", "age", "pets", "nickname"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(stack: Stack) -> str:
    return stack.model_dir.name


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}


def test_json_schema_always_validates(model: str, client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        response_format=schema_format(PERSON),
        max_tokens=200,
        temperature=1.0,
        seed=3,
        n=4,
    )
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_and_the_stream_reassembles(model: str, client: openai.OpenAI) -> None:
    kwargs = dict(
        model=model,
        messages=MESSAGES,
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0.7,
        seed=5,
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = client.chat.completions.create(**kwargs, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(streamed), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert streamed.startswith("{")


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=8)


class Owner(BaseModel):
    name: str = Field(max_length=10)
    pets: list[Pet] = Field(max_length=2)
    verified: bool


def test_sdk_parse_returns_the_pydantic_object(model: str, client: openai.OpenAI) -> None:
    resp = client.chat.completions.parse(
        model=model, messages=MESSAGES, response_format=Owner, max_tokens=200, seed=1
    )
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Owner)
    assert Owner.model_validate_json(resp.choices[0].message.content) == parsed


def test_vllm_extension_fields_on_both_endpoints(model: str, client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=model,
        prompt="Code:",
        max_tokens=30,
        seed=2,
        extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"},
    )
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", out.choices[0].text)
    out = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=10,
        seed=2,
        extra_body={"guided_choice": ["positive", "negative"]},
    )
    assert out.choices[0].message.content in ("positive", "negative")
    out = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=20,
        extra_body={"guided_grammar": 'root ::= "x=" [0-9] [0-9]?'},
    )
    assert re.fullmatch(r"x=\d\d?", out.choices[0].message.content)
    out = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=200,
        seed=9,
        extra_body={"structured_outputs": {"json": PERSON}},
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    out = client.completions.create(
        model=model, prompt="JSON:", max_tokens=200, seed=4, extra_body={"guided_json": PERSON}
    )
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"response_format": schema_format({"type": "object", "not": {}})}, "'not'"),
        ({"response_format": schema_format({"type": "strange"})}, "strange"),
        ({"response_format": {"type": "json_schema"}}, "json_schema.schema"),
        ({"guided_regex": "(ab"}, "guided_regex"),
        ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{bad"}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "at most one"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"guided_decoding_backend": "outlines"}, "xgrammar"),
        ({"structured_outputs": {"xml": "a"}}, "structured_outputs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "does not render tools"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"functions": [{"name": "f"}]}, "use tools"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_unsupported_or_invalid_is_a_400_naming_it_and_serving_goes_on(
    model: str, stack: Stack, client: openai.OpenAI, body: dict, names: str
) -> None:
    resp = httpx.post(
        f"{stack.api.url}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 5, **body},
        timeout=30,
    )
    assert resp.status_code == 400, resp.text
    assert names in resp.json()["error"]["message"], resp.json()
    ok = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=200, response_format=schema_format(PERSON)
    )
    jsonschema.validate(json.loads(ok.choices[0].message.content), PERSON)


# -- hypothesis: schemas of the supported subset -------------------------------------------

NAMES = st.text(alphabet="abcdefghij", min_size=1, max_size=6)
LEAVES = st.one_of(
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-50, 50),
        st.integers(0, 500),
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(
        lambda a, b: {"type": "string", "minLength": a, "maxLength": a + b},
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    st.lists(
        st.text(alphabet="xyz!é ", min_size=1, max_size=4), min_size=1, max_size=4, unique=True
    ).map(lambda v: {"enum": v}),
    st.sampled_from(
        [
            {"const": 7},
            {"type": "string", "format": "date"},
            {"type": "string", "pattern": "[a-c]{1,3}"},
        ]
    ),
)


def _extend(children: st.SearchStrategy) -> st.SearchStrategy:
    obj = st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {
                "type": "object",
                "properties": props,
                "required": sorted(req),
                "additionalProperties": False,
            }
        )
    )
    arr = st.builds(
        lambda items, lo, span: {
            "type": "array",
            "items": items,
            "minItems": lo,
            "maxItems": lo + span,
        },
        children,
        st.integers(0, 2),
        st.integers(0, 2),
    )
    alt = st.lists(children, min_size=2, max_size=3).map(lambda xs: {"anyOf": xs})
    return st.one_of(obj, arr, alt)


SCHEMAS = st.recursive(LEAVES, _extend, max_leaves=6).map(
    lambda s: (
        s
        if s.get("type") == "object"
        else {
            "type": "object",
            "properties": {"v": s},
            "required": ["v"],
            "additionalProperties": False,
        }
    )
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schema=SCHEMAS, seed=st.integers(0, 2**31))
def test_generated_schemas_always_validate(
    model: str, client: openai.OpenAI, schema: dict, seed: int
) -> None:
    resp = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        response_format=schema_format(schema),
        max_tokens=400,
        temperature=1.0,
        seed=seed,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", (schema, choice.message.content)
    jsonschema.validate(
        json.loads(choice.message.content), schema, format_checker=jsonschema.FormatChecker()
    )
