"""The HPUB frames of an atomic batch: one per message, its own number and fence."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.bus.event_log import (
    BATCH_ID,
    BATCH_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ,
    EventLog,
    batch_frames,
)


def parse(blob: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """(subject, headers, payload) of each HPUB frame, as nats-server reads them."""
    out = []
    while blob:
        line, _, blob = blob.partition(b"\r\n")
        op, subject, hlen, total = line.decode().split(" ")
        assert op == "HPUB"
        head, payload = blob[: int(hlen)], blob[int(hlen) : int(total)]
        assert blob[int(total) : int(total) + 2] == b"\r\n"
        blob = blob[int(total) + 2 :]
        lines = head.decode().split("\r\n")
        assert lines[0] == "NATS/1.0" and lines[-2:] == ["", ""]
        out.append((subject, dict(x.split(": ", 1) for x in lines[1:-2]), payload))
    return out


@given(
    st.lists(
        st.tuples(st.integers(0, 2**63), st.binary(max_size=300)),
        min_size=1,
        max_size=20,
    )
)
def test_frames_carry_each_message(items: list[tuple[int, bytes]]) -> None:
    entries = [
        (EventLog(f"llm.events.job{i}", fence), data) for i, (fence, data) in enumerate(items)
    ]
    frames = parse(batch_frames("b1", entries))
    assert len(frames) == len(entries)
    for i, ((subject, headers, payload), (log, data)) in enumerate(
        zip(frames, entries, strict=True), 1
    ):
        assert subject == log.subject and payload == data
        assert headers == {
            BATCH_ID: "b1",
            BATCH_SEQ: str(i),
            EXPECTED_LAST_SUBJECT_SEQ: str(log.fence),
        }
