"""The API keeps idle HTTP connections open longer than clients do (--keep-alive-timeout).

uvicorn's default closes them after 5 s, the same as httpx's pool expires them: a client
that reuses a connection at 4.99 s sends its request into one the server is closing and
gets a read error (the routing benchmark saw 2 of 384 requests fail that way). A load
balancer with a 60 s idle timeout hits the same race every time a backend closes first.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

from tests.support.stack import Stack

HEALTH = b"GET /health HTTP/1.1\r\nHost: api\r\n\r\n"


def health(sock: socket.socket) -> bool:
    """Ask for /health on `sock` and read the whole answer (headers and body)."""
    sock.sendall(HEALTH)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head.startswith(b"HTTP/1.1 200")


def open_after_idle(url: str, idle_s: float) -> bool:
    """Whether a keep-alive connection that has served one request is still open, and
    serves another, after `idle_s` seconds of silence."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        assert health(sock)
        time.sleep(idle_s)
        sock.settimeout(0.2)
        try:
            if sock.recv(1) == b"":
                return False  # the server closed it while idle
        except TimeoutError:
            pass  # nothing to read: still open
        sock.settimeout(5)
        return health(sock)


def test_an_idle_connection_outlives_the_clients_5s_pool_expiry(bus_stack: Stack) -> None:
    api = bus_stack.start_api(wait=False)
    api.wait_http("/health")
    assert open_after_idle(api.url, 5.5)


def test_the_timeout_is_the_flags(bus_stack: Stack) -> None:
    api = bus_stack.start_api("--keep-alive-timeout", "0.5", wait=False)
    api.wait_http("/health")
    assert open_after_idle(api.url, 0.1)
    assert not open_after_idle(api.url, 1.5)
