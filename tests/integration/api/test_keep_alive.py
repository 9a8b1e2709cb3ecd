"""The API keeps idle HTTP connections open longer than clients do (--keep-alive-timeout).

uvicorn's default closes them after 5 s, the same as httpx's pool expires them: a client
that reuses a connection at 4.99 s sends its request into one the server is closing and
gets a read error (the routing benchmark saw 2 of 384 requests fail that way). A load
balancer with a 60 s idle timeout hits the same race every time a backend closes first.
"""

from __future__ import annotations

import http.client
import socket
import time
from urllib.parse import urlsplit

from tests.support.stack import Stack


def open_after_idle(url: str, idle_s: float) -> bool:
    """Whether a keep-alive connection that has served one request is still open, and
    serves another on the same socket, after `idle_s` seconds of silence."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        sock = conn.sock
        time.sleep(idle_s)
        sock.settimeout(0.2)
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                return False  # the server closed it while idle
        except TimeoutError:
            pass  # nothing to read: still open
        sock.settimeout(5)
        conn.request("GET", "/health")
        second = conn.getresponse()
        second.read()
        return second.status == 200 and conn.sock is sock
    finally:
        conn.close()


def test_an_idle_connection_outlives_the_clients_5s_pool_expiry(bus_stack: Stack) -> None:
    api = bus_stack.start_api(wait=False)
    api.wait_http("/health")
    assert open_after_idle(api.url, 5.5)


def test_the_timeout_is_the_flags(bus_stack: Stack) -> None:
    api = bus_stack.start_api("--keep-alive-timeout", "0.5", wait=False)
    api.wait_http("/health")
    assert open_after_idle(api.url, 0.1)
    assert not open_after_idle(api.url, 1.5)
