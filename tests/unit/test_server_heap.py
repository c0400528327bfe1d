"""settle_heap: what a service built at start-up leaves the cycle collector's generations."""

import gc
import weakref

from rlhf.server import settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_settle_heap_freezes_what_is_alive_and_collects_garbage_first():
    cycle = _Node()
    gone = weakref.ref(cycle)
    del cycle  # garbage only the collector can free: collected, not frozen for good
    tracked = len(gc.get_objects())
    try:
        settle_heap()
        assert gone() is None
        assert gc.get_freeze_count() >= tracked // 2
        assert len(gc.get_objects()) < tracked // 10
    finally:
        gc.unfreeze()
