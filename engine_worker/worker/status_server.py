"""The worker's tiny HTTP endpoint: GET /metrics (Prometheus) and GET /health.

Plain asyncio streams instead of uvicorn: two read-only routes do not justify a second
server framework in the worker, and uvicorn would install its own signal handlers over
the worker's graceful-drain ones.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from shared.metrics import CONTENT_TYPE, render

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT_S = 5.0


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    400: "Bad Request",
    503: "Service Unavailable",
}


class StatusServer:
    """Serves `registry` at /metrics and `health()` at /health (200 if healthy else 503)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        host: str,
        port: int,
    ) -> None:
        self._registry = registry
        self._health = health
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self, fall_back_when_busy: bool = False) -> None:
        """Bind; with `fall_back_when_busy`, a port in use gives way to any free one."""
        try:
            self._server = await asyncio.start_server(self._handle, self._host, self._port)
        except OSError as e:
            if not fall_back_when_busy or e.errno != errno.EADDRINUSE:
                raise
            self._server = await asyncio.start_server(self._handle, self._host, 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def route(self, method: str, path: str) -> Response:
        path = path.split("?", 1)[0]
        if path not in ("/metrics", "/health"):
            return Response(404, b'{"error":"not found"}')
        if method not in ("GET", "HEAD"):
            return Response(405, b'{"error":"method not allowed"}')
        if path == "/metrics":
            return Response(200, render(self._registry), CONTENT_TYPE)
        ok, body = self._health()
        return Response(200 if ok else 503, json.dumps(body).encode())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            if len(head) > MAX_REQUEST_HEAD:
                raise ValueError("request head too large")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                raise ValueError("bad request line")
            resp = self.route(parts[0], parts[1])
            body = b"" if parts[0] == "HEAD" else resp.body
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            resp = Response(400, b'{"error":"bad request"}')
            body = resp.body
        try:
            writer.write(
                f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, '')}\r\n"
                f"Content-Type: {resp.content_type}\r\n"
                f"Content-Length: {len(resp.body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
