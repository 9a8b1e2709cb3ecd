"""The JSON Schema subset whose every keyword the grammar enforces.

xgrammar compiles many keywords it does not enforce (`not`, `uniqueItems`,
`multipleOf`, `patternProperties`, unknown formats, ...): output under such a schema
could fail validation. Rather than ignore a keyword silently, a schema using anything
outside this subset is refused with a 400 that names the keyword and where it is.
"""

from __future__ import annotations

from typing import Any

ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$comment", "$schema", "$id",
        "deprecated", "readOnly", "writeOnly", "discriminator",
    }
)  # fmt: skip
KEYWORDS = frozenset(
    {
        "type", "enum", "const", "anyOf", "allOf", "$ref", "$defs", "definitions",
        "properties", "required", "additionalProperties",
        "items", "prefixItems", "minItems", "maxItems",
        "minLength", "maxLength", "pattern", "format",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    }
)  # fmt: skip
FORMATS = frozenset({"date", "time", "date-time", "uuid", "email", "ipv4"})
TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
MAX_DEPTH = 32


class UnsupportedSchema(ValueError):
    pass


def check_schema(schema: Any) -> None:
    """Raise UnsupportedSchema naming the first keyword outside the subset (JSON pointer)."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema("the schema must be a JSON object")
    _check(schema, "#", 0)


def _check(node: Any, where: str, depth: int) -> None:
    if isinstance(node, bool):
        return  # true/false schemas
    if not isinstance(node, dict):
        raise UnsupportedSchema(f"{where}: a schema must be an object or a boolean")
    if depth > MAX_DEPTH:
        raise UnsupportedSchema(f"{where}: schemas nested deeper than {MAX_DEPTH} levels")
    for key in node:
        if key not in KEYWORDS and key not in ANNOTATIONS:
            raise UnsupportedSchema(f"{where}: the keyword {key!r} is not supported")
    _check_values(node, where)
    for key in ("properties", "$defs", "definitions"):
        sub = node.get(key, {})
        if not isinstance(sub, dict):
            raise UnsupportedSchema(f"{where}/{key} must be an object")
        for name, child in sub.items():
            _check(child, f"{where}/{key}/{name}", depth + 1)
    for key in ("anyOf", "allOf", "prefixItems"):
        if key in node:
            items = node[key]
            if not isinstance(items, list) or not items:
                raise UnsupportedSchema(f"{where}/{key} must be a non-empty array")
            for i, child in enumerate(items):
                _check(child, f"{where}/{key}/{i}", depth + 1)
    for key in ("items", "additionalProperties"):
        if key in node:
            _check(node[key], f"{where}/{key}", depth + 1)


def _check_values(node: dict[str, Any], where: str) -> None:
    if "allOf" in node and isinstance(node["allOf"], list) and len(node["allOf"]) > 1:
        raise UnsupportedSchema(f"{where}/allOf: only a single schema is supported")
    fmt = node.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise UnsupportedSchema(
            f"{where}/format: {fmt!r} is not supported (supported: {', '.join(sorted(FORMATS))})"
        )
    if "format" in node and "pattern" in node:
        raise UnsupportedSchema(f"{where}: format and pattern together are not supported")
    types = node.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in TYPES:
            raise UnsupportedSchema(f"{where}/type: {t!r} is not a JSON Schema type")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise UnsupportedSchema(f"{where}/$ref: only local references (#/...) are supported")
    required = node.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        raise UnsupportedSchema(f"{where}/required must be an array of property names")
