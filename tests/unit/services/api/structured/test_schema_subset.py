"""The JSON Schema subset: what the grammar enforces passes, the rest is named."""

from __future__ import annotations

import pytest

from services.api.structured.schema_subset import UnsupportedSchema, check_schema


@pytest.mark.parametrize(
    "schema",
    [
        {
            "type": "object",
            "properties": {"a": {"type": "string", "maxLength": 3}},
            "required": ["a"],
        },
        {
            "$defs": {"P": {"type": "integer", "minimum": 0}},
            "type": "array",
            "items": {"$ref": "#/$defs/P"},
        },
        {"anyOf": [{"type": "null"}, {"enum": ["x", 1]}], "title": "t", "description": "d"},
        {"type": ["string", "null"], "format": "date"},
        {"type": "array", "prefixItems": [{"const": 1}], "items": False, "maxItems": 1},
    ],
)
def test_supported(schema) -> None:
    check_schema(schema)


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"not": {"type": "string"}}, "'not'"),
        (
            {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
            "#/properties/a",
        ),
        ({"type": "integer", "multipleOf": 3}, "multipleOf"),
        ({"type": "string", "format": "hostname"}, "hostname"),
        ({"oneOf": [{"type": "integer"}]}, "oneOf"),
        ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "allOf"),
        ({"type": "strange"}, "strange"),
        ({"$ref": "http://example.com/s.json"}, "local"),
        ([1, 2], "JSON object"),
    ],
)
def test_unsupported_is_named(schema, named) -> None:
    with pytest.raises(UnsupportedSchema, match=named):
        check_schema(schema)
