import gc

import pytest

from shared.gc_tuning import YOUNG_THRESHOLD, tune_gc

pytestmark = pytest.mark.unit


@pytest.fixture
def restore_gc():
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_startup_heap_is_frozen_and_young_collections_are_rarer(restore_gc):
    startup = [object() for _ in range(1000)]
    tune_gc()
    assert gc.get_freeze_count() >= len(startup)
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD


def test_cycles_made_after_tuning_are_still_collected(restore_gc):
    tune_gc()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    ids = {id(a), id(b)}
    del a, b
    gc.collect()
    assert not any(id(o) in ids for o in gc.get_objects() if isinstance(o, Node))
