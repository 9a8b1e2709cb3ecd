"""Settings of the API's gateway layer: auth, edge limits, CORS and the fallback upstream.

Kept apart from `shared.settings.ApiSettings` because only the API reads them. Env vars
configure containers; `jetserve api` flags override them (flags win), as everywhere else.
Auth is on unless switched off: the local launcher (`jetserve up`) passes `--auth off`,
compose and Kubernetes set `JETSERVE_AUTH=1` explicitly.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace
from typing import Self

ENV_PREFIX = "JETSERVE_"
# "/" and /api/version: Ollama clients probe them before sending a key.
DEFAULT_PUBLIC_PATHS = ("/health", "/ready", "/metrics", "/", "/api/version")
MIB = 1024 * 1024


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name)
    return value if value not in (None, "") else None


def _env_float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{ENV_PREFIX}{name} must be a number, got {raw!r}") from e


def parse_switch(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected on/off (1/0), got {raw!r}")


def _list(raw: str | None, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    if raw is None:
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class GatewaySettings:
    auth: bool = True
    api_keys_file: str | None = None  # JSON or YAML list of keys seeded at start-up
    api_keys: str | None = None  # comma-separated secrets (name=secret also accepted)
    public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS  # answered without a key
    max_body_bytes: int = 8 * MIB
    body_timeout_s: float = 30.0  # the whole request body must arrive within this
    request_timeout_s: float = 600.0  # until the first response byte (streams: the headers)
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    fallback_url: str | None = None  # an OpenAI-compatible base URL, e.g. http://host/v1
    fallback_api_key: str | None = None
    fallback_queue_wait_s: float = 30.0  # head-of-line queue wait that diverts; 0 = never
    fallback_timeout_s: float = 600.0
    queue_poll_interval_s: float = 1.0

    @classmethod
    def from_env(cls) -> Self:
        auth = _env("AUTH")
        return cls(
            auth=True if auth is None else parse_switch(auth),
            api_keys_file=_env("API_KEYS_FILE"),
            api_keys=_env("API_KEYS"),
            public_paths=_list(_env("PUBLIC_PATHS"), DEFAULT_PUBLIC_PATHS),
            max_body_bytes=int(_env_float("MAX_BODY_BYTES", 8 * MIB)),
            body_timeout_s=_env_float("BODY_TIMEOUT", 30.0),
            request_timeout_s=_env_float("REQUEST_TIMEOUT", 600.0),
            cors_origins=_list(_env("CORS_ORIGINS")),
            fallback_url=_env("FALLBACK_URL"),
            fallback_api_key=_env("FALLBACK_API_KEY"),
            fallback_queue_wait_s=_env_float("FALLBACK_QUEUE_WAIT", 30.0),
            fallback_timeout_s=_env_float("FALLBACK_TIMEOUT", 600.0),
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        settings = cls.from_env()
        names = {f.name for f in fields(settings)}
        changes = {k: v for k, v in vars(args).items() if k in names and v is not None}
        return replace(settings, **changes)


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auth",
        type=parse_switch,
        help="on: every endpoint but /health, /ready, /metrics needs an API key "
        "(default on) [env JETSERVE_AUTH]",
    )
    parser.add_argument("--api-keys-file", help="keys to seed [env JETSERVE_API_KEYS_FILE]")
    parser.add_argument(
        "--fallback-url",
        help="OpenAI-compatible base URL used when no worker serves the model or the "
        "queue is too long [env JETSERVE_FALLBACK_URL]",
    )
    parser.add_argument(
        "--fallback-queue-wait",
        dest="fallback_queue_wait_s",
        type=float,
        help="seconds of head-of-line queue wait that divert to the fallback "
        "(0 = only when no worker) [env JETSERVE_FALLBACK_QUEUE_WAIT]",
    )
    parser.add_argument(
        "--cors-origins",
        type=lambda s: _list(s),
        help="comma-separated allowed origins, * for any [env JETSERVE_CORS_ORIGINS]",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, help="request body limit [env JETSERVE_MAX_BODY_BYTES]"
    )
    parser.add_argument(
        "--request-timeout",
        dest="request_timeout_s",
        type=float,
        help="seconds until the first response byte [env JETSERVE_REQUEST_TIMEOUT]",
    )
