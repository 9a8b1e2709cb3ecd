"""API errors in the dialect of the route: OpenAI's shape, or Ollama's on its routes.

OpenAI: `{"error": {"message", "type", "param", "code"}}` with the HTTP status OpenAI uses
for that kind of failure, so SDKs raise their matching exception classes. Ollama's routes
(`/` and `/api/...`) answer `{"error": "<message>"}` with the same status, which is what
Ollama clients read; `error_response` picks the shape from the request path, so the
gateway's 401/413/429 reach an Ollama client in its own dialect too.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.responses import JSONResponse, Response

# status -> OpenAI error `type`
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


@dataclass
class APIError(Exception):
    """Raised anywhere in a request handler; rendered by the app's exception handler."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


MAX_ECHO_CHARS = 96  # client input quoted back in an error is cut to this


def echo(value: str) -> str:
    """Client input as an error message quotes it: bounded, so an error never carries
    (or amplifies) a 100,000-character name back to the client and into logs."""
    return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "..."


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{echo(model)}' does not exist or has no live worker.",
        param="model",
        code="model_not_found",
    )


def service_unavailable(message: str) -> APIError:
    return APIError(503, message, code="service_unavailable")


def internal_error(message: str) -> APIError:
    return APIError(500, message, code="internal_error")


# Headers an error response carries in either dialect.
_KEPT_HEADERS = ("retry-after", "www-authenticate")


def ollama_path(path: str) -> bool:
    """Ollama's dialect: its root probe and everything under /api/."""
    return path == "/" or path.startswith("/api/")


def ollama_body(message: str) -> dict:
    return {"error": message}


def error_response(exc: APIError, path: str) -> Response:
    """The error as the client of this path expects it."""
    resp = exc.response()
    if not ollama_path(path):
        return resp
    out = JSONResponse(ollama_body(exc.message), status_code=exc.status)
    for name in _KEPT_HEADERS:
        if name in resp.headers:
            out.headers[name] = resp.headers[name]
    return out
