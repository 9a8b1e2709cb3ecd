"""Bearer-token authentication, as the OpenAI SDK sends it: `Authorization: Bearer <key>`.

Failures are 401s in OpenAI's error format; the message says what was wrong (missing,
malformed, unknown or revoked) but never echoes the presented secret.
"""

from __future__ import annotations

from services.api.errors import APIError
from services.api.gateway.key_store import KeyStore
from services.api.gateway.keys import ApiKeyRecord

MAX_SECRET_CHARS = 256


class AuthError(APIError):
    """401 with `WWW-Authenticate: Bearer`, and the reason for the failure metric."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(401, message, code="invalid_api_key")
        self.reason = reason

    def response(self):
        resp = super().response()
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError(
            "You didn't provide an API key. Send it in the Authorization header as "
            "'Authorization: Bearer YOUR_KEY'; create one with `jetserve keys create "
            "--name NAME` (docs/gateway.md).",
            "missing",
        )
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_SECRET_CHARS:
        raise AuthError(
            "Malformed Authorization header; expected 'Authorization: Bearer YOUR_KEY'.",
            "malformed",
        )
    return token


def authenticate(store: KeyStore, authorization: str | None) -> ApiKeyRecord:
    record = store.lookup(bearer_token(authorization))
    if record is None:
        raise AuthError("Incorrect API key provided.", "invalid")
    if record.revoked:
        raise AuthError("This API key has been revoked.", "revoked")
    return record
