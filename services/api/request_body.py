"""A request body parsed into its pydantic model, with errors phrased for the client.

Every JSON route (OpenAI, jobs) parses through `parse_body`, so a bad body gets the same
OpenAI-format 400 wherever it is sent.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from services.api.errors import APIError, bad_request

M = TypeVar("M", bound=BaseModel)

_UNION_TAGS = {"str", "int", "float", "bool", "function-after"}


def _is_union_tag(part: object) -> bool:
    """pydantic puts the union member tried ('str', 'list[int]') into error locations."""
    return isinstance(part, str) and ("[" in part or part in _UNION_TAGS or part[:1].isupper())


def validation_error(e: ValidationError) -> APIError:
    """The first problem, phrased for a client: which parameter, what was expected."""
    errors = e.errors(include_url=False)
    err = errors[0]
    if err["type"] == "json_invalid":
        return bad_request(
            f"We could not parse the JSON body of your request: {err['msg']}", code="invalid_json"
        )

    def param_of(error: dict) -> str:
        return ".".join(str(p) for p in error["loc"] if not _is_union_tag(p))

    param = param_of(err) or None
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    if param is None:
        return bad_request(f"Invalid request body: {err['msg']}")
    tried = [
        next((p for p in x["loc"] if _is_union_tag(p)), None)
        for x in errors
        if param_of(x).startswith(param)
    ]
    tried = list(dict.fromkeys(t for t in tried if t))
    if len(tried) > 1:
        return bad_request(
            f"Invalid type for '{param}': expected one of {', '.join(tried)}.", param=param
        )
    return bad_request(f"Invalid value for '{param}': {err['msg']}", param=param)


def parse_body(model: type[M], body: bytes) -> M:
    if not body:
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None
