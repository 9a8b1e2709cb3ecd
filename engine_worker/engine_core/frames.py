"""Length-prefixed frames on a stream socket: a 4-byte big-endian length, then the bytes.

The worker side reads with `FrameDecoder`, fed whatever the socket had (never blocking
its event loop on a half-arrived frame); the engine process writes a whole frame with
one `sendall` and reads its commands without blocking between steps (`read_ready`).
"""

from __future__ import annotations

import select
import socket
import struct

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30  # a larger length is a corrupted stream, not a message


class FrameError(ValueError):
    """The byte stream is not a sequence of frames (a bug or a corrupted link)."""


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes is over {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Cuts a byte stream, arriving in arbitrary pieces, into the frames it carries."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by `data`, in order; a partial one is kept for later."""
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise FrameError(f"frame length {size} is over {MAX_FRAME}")
            start = pos + HEADER.size
            if end - start < size:
                break
            frames.append(bytes(buf[start : start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet complete."""
        return len(self._buf)


def read_ready(sock: socket.socket, wait_s: float, chunk: int = 1 << 16) -> bytes | None:
    """What the socket holds now (b"" if nothing arrives within `wait_s`); None at EOF."""
    if wait_s > 0:
        readable, _, _ = select.select([sock], [], [], wait_s)
        if not readable:
            return b""
    parts: list[bytes] = []
    while True:
        try:
            data = sock.recv(chunk, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not data:
            return b"".join(parts) if parts else None
        parts.append(data)
        if len(data) < chunk:
            break
    return b"".join(parts)


def read_frames(sock: socket.socket, decoder: FrameDecoder) -> list[bytes] | None:
    """Block until at least one whole frame arrived; None at EOF."""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return None
        frames = decoder.feed(data)
        if frames:
            return frames
