"""A step's stored Deltas as messages per API replica: codec round trips and grouping."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.bus.step_delivery import STEP_MESSAGE_BYTES, step_messages
from shared.bus.subjects import events_subject, is_steps_subject, steps_subject
from shared.messages import (
    CompletionChunk,
    Delta,
    MessageError,
    Usage,
    decode_delta,
    decode_step_deltas,
    encode_delta,
    encode_step_deltas,
)


@st.composite
def deltas(draw) -> Delta:
    chunks = [
        CompletionChunk(
            index=i,
            token_ids=draw(st.lists(st.integers(0, 2**31 - 1), max_size=4)),
            finish_reason=draw(st.sampled_from([None, "stop", "length"])),
        )
        for i in range(draw(st.integers(1, 3)))
    ]
    return Delta(
        job_id=draw(st.text("abcdef0123456789", min_size=1, max_size=16)),
        seq=draw(st.integers(0, 10**6)),
        chunks=chunks,
        finished=draw(st.booleans()),
        worker_id="w0",
    )


@given(st.lists(deltas(), max_size=8))
def test_step_deltas_round_trip(ds: list[Delta]) -> None:
    assert decode_step_deltas(encode_step_deltas([encode_delta(d) for d in ds])) == ds


@pytest.mark.parametrize("n", [0, 15, 16, 65535, 65536])
def test_every_array_header_size(n: int) -> None:
    """The spliced message is the msgpack a plain encoder writes, at every header size."""
    one = encode_delta(Delta(job_id="j", seq=1, chunks=[CompletionChunk(0, [7])]))
    spliced = encode_step_deltas([one] * n)
    assert msgpack.unpackb(spliced) == {"v": 1, "deltas": [msgpack.unpackb(one)] * n}
    assert len(decode_step_deltas(spliced)) == n


def test_unusual_deltas_take_the_checked_path() -> None:
    """Logprobs, usage, errors: decoded field by field, same result as decode_delta."""
    d = Delta(
        job_id="j",
        seq=3,
        chunks=[CompletionChunk(0, [5], [(5, -0.5, [(6, -1.0)])], "stop")],
        finished=True,
        usage=Usage(3, 1, 0, 0.25, 0.5),
        error=None,
        worker_id="w",
    )
    assert decode_step_deltas(encode_step_deltas([encode_delta(d)])) == [
        decode_delta(encode_delta(d))
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # not msgpack
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({"v": 1}),  # no deltas
        msgpack.packb({"v": 1, "deltas": "x"}),
        msgpack.packb({"v": 1, "deltas": ["text, not a Delta"]}),
        msgpack.packb({"v": 1, "deltas": [{"v": 2, "job_id": "j", "seq": 0, "chunks": []}]}),
        msgpack.packb({"v": 1, "deltas": [{"v": 1, "job_id": "j", "seq": -1, "chunks": []}]}),
        msgpack.packb({"v": 0, "deltas": []}),
    ],
)
def test_malformed_step_messages_raise(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode_step_deltas(data)


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.binary(max_size=64).map(msgpack.packb)),
        max_size=40,
    )
)
def test_grouped_per_replica_in_order(entries: list[tuple[str, bytes]]) -> None:
    stored = [(steps_subject(r), data) for r, data in entries]
    out = step_messages(stored)
    assert len({s for s, _ in out}) == len(out)  # one message per replica (all small)
    for subject, payload in out:
        assert msgpack.unpackb(payload)["deltas"] == [
            msgpack.unpackb(d) for s, d in stored if s == subject
        ]


def test_jobs_nobody_follows_live_are_left_out() -> None:
    stored = [(events_subject("job1"), b"x"), ("llm.steps.*", b"y"), ("llm.steps.a.b", b"z")]
    assert step_messages(stored) == []
    assert is_steps_subject(steps_subject("r1"))
    assert not any(is_steps_subject(s) for s, _ in stored)


def test_a_large_step_is_split_without_reordering() -> None:
    big = [msgpack.packb(bytes([i]) * (STEP_MESSAGE_BYTES // 3 - 8)) for i in range(7)]
    out = step_messages([(steps_subject("r"), b) for b in big])
    assert len(out) == 3  # three third-size Deltas fill a message: 3 + 3 + 1
    assert all(len(p) <= STEP_MESSAGE_BYTES + 64 for _, p in out)
    assert [d for _, p in out for d in msgpack.unpackb(p)["deltas"]] == [
        msgpack.unpackb(b) for b in big
    ]
