"""A lean streaming HTTP/1.1 client for the benchmarks: keep-alive connections, chunked
SSE, and CPU per token far below a general-purpose client's.

Why not httpx: its connection pool checks every connection on each request, so a pool
of 256 streams spends most of the client's CPU there (py-spy at 256 concurrent:
`is_idle` alone 18% of the client; a burst of 256 requests reached the API over 4-6 s
while the API and the worker sat idle). On a machine the client shares with the stack
that CPU is taken from what is measured. Here a pool is a stack of idle connections
(O(1) per request) and a response is read with `readline`/`readexactly`.

It speaks just enough HTTP/1.1 for jetserve's API: a JSON POST, a chunked or sized
response, keep-alive.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit


class EventTally:
    """Token timing from SSE events: only the rare events (usage, error) are parsed, so the
    client costs as little CPU as possible next to the stack it measures."""

    def __init__(self, result: Any) -> None:
        self.result = result  # a serving_bench.RequestResult
        self.chunks = 0
        self.last = result.start
        self._buf = b""

    def feed(self, data: bytes, now: float) -> bool:
        """Take response bytes; False once an error event ended the stream."""
        self._buf += data
        *events, self._buf = self._buf.split(b"\n\n")
        res = self.result
        for event in events:
            payload = next((ln[6:] for ln in event.split(b"\n") if ln.startswith(b"data: ")), None)
            if payload is None or payload == b"[DONE]":
                continue
            if payload.startswith(b'{"error"'):
                res.error = str(json.loads(payload)["error"].get("message"))
                return False
            if b'"choices":[]' in payload or b'"choices": []' in payload:
                usage = json.loads(payload).get("usage") or {}
                res.output_tokens = int(usage.get("completion_tokens", 0))
                res.prompt_tokens = int(usage.get("prompt_tokens", 0))
                details = usage.get("prompt_tokens_details") or {}
                res.cached_tokens = int(details.get("cached_tokens") or 0)
                continue
            if b'"delta":{"role"' in payload:
                continue  # a chat stream's role chunk, sent before any token
            if self.chunks == 0:
                res.ttft = now - res.start
            else:
                res.itl.append(now - self.last)
            self.chunks += 1
            self.last = now
        return True

    def finish(self) -> Any:
        res = self.result
        res.e2e = time.perf_counter() - res.start
        res.output_tokens = res.output_tokens or self.chunks
        res.ok = self.chunks > 0 and not res.error
        if self.chunks == 0 and not res.error:
            res.error = "no tokens streamed"
        return res


class HttpError(Exception):
    pass


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, head: bytes, body: bytes, tally: EventTally) -> tuple[int, bool]:
        """Send one request, feed the response to `tally`; (status, connection reusable)."""
        self.writer.write(head + body)
        r = self.reader
        status_line = await r.readline()
        if not status_line:
            raise HttpError("connection closed")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, keep = None, False, True
        while (line := await r.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and value == b"close":
                keep = False
        if status != 200:
            data = await (r.readexactly(length) if length is not None else r.read())
            tally.result.error = f"HTTP {status}: {data[:200].decode(errors='replace')}"
            return status, False
        going = True
        if chunked:
            while True:
                size = int((await r.readline()).split(b";", 1)[0], 16)
                data = await r.readexactly(size + 2)
                if size == 0:
                    break
                if going:
                    going = tally.feed(data[:-2], time.perf_counter())
        elif length is not None:
            tally.feed(await r.readexactly(length), time.perf_counter())
        else:
            tally.feed(await r.read(), time.perf_counter())
            keep = False
        return status, keep

    def close(self) -> None:
        self.writer.close()


class SseClient:
    """Streamed POSTs to one API base URL over a pool of keep-alive connections."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        u = urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {u.netloc}\r\nContent-Type: application/json\r\n{extra}"
        self._idle: list[_Connection] = []

    async def stream(self, path: str, payload: dict, result: Any) -> Any:
        """POST `payload`, time its SSE events into `result` (a serving_bench.RequestResult)."""
        body = json.dumps(payload).encode()
        head = f"POST {path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n"
        tally = EventTally(result)
        conn = self._idle.pop() if self._idle else None
        try:
            try:
                if conn is None:
                    conn = _Connection(*await asyncio.open_connection(self.host, self.port))
                _, keep = await conn.post(head.encode(), body, tally)
            except HttpError:
                # A kept-alive connection the server has closed meanwhile: one fresh try.
                conn.close()
                conn = _Connection(*await asyncio.open_connection(self.host, self.port))
                _, keep = await conn.post(head.encode(), body, tally)
        except (OSError, HttpError, ValueError, asyncio.IncompleteReadError) as e:
            if conn is not None:
                conn.close()
            result.error = f"{type(e).__name__}: {e}"
            return result
        if keep:
            self._idle.append(conn)
        else:
            conn.close()
        return tally.finish()

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
