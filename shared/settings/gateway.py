"""The API's gateway layer: auth, edge limits, CORS and the fallback upstream.

Only `jetserve api` reads these. Auth is on unless switched off: the local launcher
(`jetserve up`) passes `--no-auth`, compose and Kubernetes set `JETSERVE_AUTH=1`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import ByteSize

from shared.settings.fields import Settings, setting

# "/" and /api/version: Ollama clients probe them before sending a key.
DEFAULT_PUBLIC_PATHS = ("/health", "/ready", "/metrics", "/", "/api/version")


class GatewaySettings(Settings):
    section: ClassVar[str] = "gateway"

    auth: bool = setting(
        True, help="every endpoint but the public paths needs an API key (Authorization: Bearer)"
    )
    api_keys_file: str | None = setting(
        None,
        help="JSON or YAML file of keys to seed at start-up: a list, or {keys: [...]}, "
        "each {key, name, priority, limits}",
    )
    api_keys: str | None = setting(
        None,
        flag=None,
        help="keys to seed, comma-separated secrets or name=secret pairs; env only, so no "
        "secret shows in the process list",
    )
    public_paths: tuple[str, ...] = setting(
        DEFAULT_PUBLIC_PATHS, help="paths answered without a key"
    )
    max_body_bytes: ByteSize = setting(
        ByteSize(8 * 1024 * 1024), ge=1, help="request body limit; a larger body gets 413"
    )
    body_timeout_s: float = setting(
        30.0, gt=0, help="the whole request body must arrive within this, else 408"
    )
    request_timeout_s: float = setting(
        600.0, gt=0, help="time until the first response byte (streams: the headers), else 504"
    )
    cors_origins: tuple[str, ...] = setting(
        (), help="allowed browser origins, * for any; empty sends no CORS headers at all"
    )
    fallback_url: str | None = setting(
        None,
        help="OpenAI-compatible base URL (e.g. http://host/v1) that gets requests when no "
        "worker serves the model or the queue is too long",
    )
    fallback_api_key: str | None = setting(
        None, flag=None, help="API key sent to the fallback upstream; env only (a secret)"
    )
    fallback_queue_wait_s: float = setting(
        30.0,
        ge=0,
        help="head-of-line queue wait that diverts new requests to the fallback; 0 diverts "
        "only when no worker serves the model",
    )
    fallback_timeout_s: float = setting(
        600.0, gt=0, help="timeout of one request to the fallback upstream"
    )
    queue_poll_interval_s: float = setting(
        1.0, gt=0, help="how often the queue wait of each model is measured for the fallback"
    )
    max_open_streams: int = setting(
        512,
        ge=1,
        help="jobs this replica follows at once, all keys together (streams, re-attaches, "
        "job event streams: each holds NATS server state); beyond it a 429",
    )
    max_open_streams_per_key: int = setting(
        128, ge=1, help="jobs this replica follows at once for one API key; beyond it a 429"
    )
