"""The API's OpenAPI document, served at GET /openapi.json (behind the API key).

The handlers parse their bodies themselves (strict pydantic from raw bytes, so errors can
be phrased OpenAI's way), which leaves FastAPI's generated document without request
bodies. This adds them from the same pydantic request models the handlers use, plus the
bearer security scheme, so schema-driven tools (SDK generators, schemathesis) see the
real contract.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from services.api.openai.schemas import ChatCompletionRequest, CompletionRequest

OPENAPI_PATH = "/openapi.json"
REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
REF_TEMPLATE = "#/components/schemas/{model}"


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def build_openapi(app: FastAPI, public_paths: tuple[str, ...]) -> dict[str, Any]:
    doc = get_openapi(title="jetserve", version="1", routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            if path in public_paths:
                op["security"] = []
            else:
                op["security"] = [{"bearerAuth": []}]
                op.setdefault("responses", {})["401"] = _error_response("missing or bad key")
            model = REQUEST_BODIES.get(path) if method == "post" else None
            if model is None:
                continue
            schema = model.model_json_schema(ref_template=REF_TEMPLATE)
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": REF_TEMPLATE.format(model=model.__name__)}
                    }
                },
            }
            op["responses"]["400"] = _error_response("invalid request")
            op["responses"]["429"] = _error_response("rate limited")
    return doc


def install_openapi(app: FastAPI, public_paths: tuple[str, ...]) -> None:
    """Serve the document (built once, on first use, when every route is registered)."""
    cache: dict[str, Any] = {}

    async def openapi(_: Request) -> JSONResponse:
        if "doc" not in cache:
            cache["doc"] = build_openapi(app, public_paths)
        return JSONResponse(cache["doc"])

    app.add_route(OPENAPI_PATH, openapi, methods=["GET"], include_in_schema=False)
