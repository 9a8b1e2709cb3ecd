"""The API's block-hash index: any delivery of a worker's events (reordered, duplicated,
with gaps) followed by a snapshot gives exactly the worker's true set of hashes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.routing.prefix_index import PrefixIndex
from shared.bus.kv_events import KvEvents, KvSnapshot

pytestmark = pytest.mark.unit

HASHES = [bytes([i]) * 16 for i in range(24)]


def history(ops: list[list[tuple[int, bool]]], worker: str = "w1", epoch: int = 7):
    """Event messages for a sequence of steps, and the true set after each seq."""
    truth: set[bytes] = set()
    events, truths = [], [set()]
    for seq, step in enumerate(ops, start=1):
        changes: dict[bytes, bool] = {}
        for i, present in step:
            changes[HASHES[i]] = present  # the block manager's net change per step
        for h, present in changes.items():
            (truth.add if present else truth.discard)(h)
        stored = [h for h, p in changes.items() if p]
        evicted = [h for h, p in changes.items() if not p]
        events.append(KvEvents(worker, epoch, seq, stored, evicted, 16))
        truths.append(set(truth))
    return events, truths


steps = st.lists(
    st.lists(st.tuples(st.integers(0, len(HASHES) - 1), st.booleans()), max_size=6),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(ops=steps, data=st.data())
def test_any_delivery_then_snapshot_equals_truth(ops, data) -> None:
    events, truths = history(ops)
    delivered = data.draw(st.lists(st.sampled_from(events), max_size=2 * len(events)))
    snap_seq = data.draw(st.integers(0, len(events)))
    index = PrefixIndex()
    for ev in delivered:
        index.apply_events(ev)
    # The snapshot reflects seq `snap_seq`; every event after it then arrives, in any order.
    index.apply_snapshot(KvSnapshot("w1", 7, snap_seq, sorted(truths[snap_seq]), 16))
    later = events[snap_seq:]
    random.Random(data.draw(st.integers(0, 2**16))).shuffle(later)
    for ev in later:
        index.apply_events(ev)
    current_seq = index.workers["w1"].seq
    if current_seq == len(events):
        assert index.hashes_of("w1") == truths[-1]
        assert not index.check_head("w1", 7, len(events))
    else:  # the snapshot was older than events already applied: it was ignored
        assert current_seq > snap_seq
        assert index.hashes_of("w1") == truths[current_seq]
        index.apply_snapshot(KvSnapshot("w1", 7, len(events), sorted(truths[-1]), 16))
        assert index.hashes_of("w1") == truths[-1]
    # The reverse map agrees with the per-worker sets.
    assert set(index.owners) == truths[-1]


@settings(max_examples=200, deadline=None)
@given(ops=steps, data=st.data())
def test_a_gap_is_detected_and_in_order_delivery_needs_no_snapshot(ops, data) -> None:
    events, truths = history(ops)
    index = PrefixIndex()
    assert not any(index.apply_events(ev) for ev in events)
    assert index.hashes_of("w1") == truths[-1]
    # A fresh replica that misses one event asks for a snapshot, and keeps asking
    # (heartbeat check) until it gets one.
    if len(events) >= 2:
        skip = data.draw(st.integers(0, len(events) - 2))
        fresh = PrefixIndex()
        needs = [fresh.apply_events(ev) for i, ev in enumerate(events) if i != skip]
        assert any(needs)
        assert fresh.check_head("w1", 7, len(events))
        fresh.apply_snapshot(KvSnapshot("w1", 7, len(events), sorted(truths[-1]), 16))
        assert fresh.hashes_of("w1") == truths[-1]
        assert not fresh.check_head("w1", 7, len(events))


def test_a_new_epoch_starts_over_and_old_epochs_are_ignored() -> None:
    index = PrefixIndex()
    index.apply_events(KvEvents("w1", 1, 1, [HASHES[0], HASHES[1]], []))
    assert index.hashes_of("w1") == {HASHES[0], HASHES[1]}
    assert not index.apply_events(KvEvents("w1", 2, 1, [HASHES[2]], []))  # restarted
    assert index.hashes_of("w1") == {HASHES[2]}
    assert not index.apply_events(KvEvents("w1", 1, 2, [HASHES[3]], []))  # late, old process
    assert index.hashes_of("w1") == {HASHES[2]}
    assert index.apply_events(KvEvents("w2", 5, 9, [HASHES[4]], []))  # seen mid-stream
    index.drop_worker("w1")
    assert index.hashes_of("w1") == set() and HASHES[2] not in index.owners


def test_matched_blocks_counts_the_leading_chain_only() -> None:
    index = PrefixIndex()
    index.apply_events(KvEvents("w1", 1, 1, [HASHES[0], HASHES[1], HASHES[3]], []))
    assert index.matched_blocks("w1", HASHES[:5]) == 2
    assert index.matched_blocks("w1", [HASHES[1]]) == 1
    assert index.matched_blocks("nobody", HASHES[:2]) == 0
