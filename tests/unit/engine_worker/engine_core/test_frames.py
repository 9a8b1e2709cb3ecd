"""Length-prefixed frames: any payloads, cut into any pieces, come out whole and in order."""

from __future__ import annotations

import itertools
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_worker.engine_core.frames import (
    HEADER,
    MAX_FRAME,
    FrameDecoder,
    FrameError,
    frame,
    read_frames,
    read_ready,
)

payloads = st.lists(st.binary(max_size=300), max_size=12)


@settings(max_examples=300, deadline=None)
@given(payloads, st.lists(st.integers(min_value=0, max_value=4000), max_size=20))
def test_any_cut_of_a_stream_gives_back_its_frames(items: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in items)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out += decoder.feed(stream[a:b])
    assert out == items
    assert decoder.pending == 0


def test_a_partial_frame_waits_for_its_rest() -> None:
    decoder = FrameDecoder()
    data = frame(b"hello") + frame(b"")
    assert decoder.feed(data[:3]) == []
    assert decoder.feed(data[3:7]) == []
    assert decoder.pending == 7
    assert decoder.feed(data[7:]) == [b"hello", b""]


def test_a_corrupt_length_is_an_error_not_a_huge_buffer() -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(HEADER.pack(MAX_FRAME + 1) + b"x")


def test_socket_reads_never_block_and_see_the_end() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert read_ready(b, 0.0) == b""  # nothing there: returns at once
        assert read_ready(b, 0.01) == b""
        a.sendall(frame(b"one") + frame(b"two"))
        decoder = FrameDecoder()
        assert read_frames(b, decoder) == [b"one", b"two"]
        big = frame(bytes(200_000))
        a.sendall(big[:70_000])
        got = read_ready(b, 0.5)
        assert got and decoder.feed(got) == []
        a.sendall(big[70_000:])
        rest = b""
        while decoder.pending + len(rest) < len(big):
            rest += read_ready(b, 0.5) or b""
        assert decoder.feed(rest) == [bytes(200_000)]
        a.close()
        assert read_ready(b, 0.5) is None  # the peer is gone
        assert read_frames(b, decoder) is None
