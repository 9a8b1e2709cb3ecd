"""The worker's /metrics port: a busy default gives way to a free port (several workers on
one host), a busy port the person chose is an error."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry

from engine_worker.worker.status_server import StatusServer


def server(port: int) -> StatusServer:
    return StatusServer(CollectorRegistry(), lambda: (True, {}), "127.0.0.1", port)


async def test_a_busy_port_falls_back_only_when_allowed() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(OSError):
            await server(busy).start(fall_back_when_busy=False)
        s = server(busy)
        await s.start(fall_back_when_busy=True)
        try:
            assert s.port not in (busy, 0)
            assert s.route("GET", "/health").status == 200
        finally:
            await s.stop()
