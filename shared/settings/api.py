"""The stateless API service (`jetserve api`); its gateway layer is in gateway.py."""

from __future__ import annotations

from typing import ClassVar, Literal

from shared.settings.bus import BusSettings
from shared.settings.fields import setting


class ApiSettings(BusSettings):
    section: ClassVar[str] = "API"

    host: str = setting("0.0.0.0", env="API_HOST", help="bind address of the HTTP server")
    port: int = setting(8000, ge=1, le=65535, env="API_PORT", help="HTTP port")
    drain_timeout_s: float = setting(
        30.0,
        ge=0,
        env="API_DRAIN_TIMEOUT",
        help="on SIGTERM, new requests get 503 while open streams get this long to finish",
    )
    keep_alive_timeout_s: float = setting(
        75.0,
        gt=0,
        help="an idle HTTP keep-alive connection is closed after this long. Keep it above "
        "the idle timeouts of clients (httpx's pool: 5 s) and load balancers in front "
        "(often 60 s): with equal ones a request can be sent on a connection the API is "
        "just closing, and fails",
    )
    routing: Literal["queue", "prefix"] = setting(
        "queue",
        help="where jobs go: `queue`, the model's shared queue (the first free worker takes "
        "each); `prefix`, the worker that holds most of the prompt's KV prefix, unless busier "
        "than the prefill it saves, falling back to the shared queue (docs/routing.md)",
    )
    routing_load_tokens: float = setting(
        64.0,
        ge=0,
        help="prefix routing: the prefill tokens one more running sequence on a worker is "
        "worth (the load term of a worker's cost; waiting ones count 4x)",
    )
    routing_cold: Literal["queue", "place"] = setting(
        "place",
        help="prefix routing: where a prompt goes that no worker holds any block of: `queue`, "
        "the shared queue; `place`, the least loaded worker (ties: rendezvous hash of its "
        "first block), and the router counts what it sent a worker as cached there until "
        "the job ends, so a burst on one system prompt converges (docs/routing.md)",
    )
    reattach_grace_s: float = setting(
        0.0,
        ge=0,
        help="a streaming client that disconnects has its job cancelled after this long "
        "unless it re-attaches (Last-Event-ID) through any replica; 0 cancels at once",
    )
