"""Batch collection rules of the generation batcher (no model needed: `_next_batch` only)."""

import threading
import time

from rlhf.batching import DynamicBatcher, Job
from rlhf.decoding import Sampling


def _batcher(gap=0.01, max_batch=8):
    return DynamicBatcher(policy=None, eos_ids={2}, pad_id=0, max_batch=max_batch, max_wait_s=gap)


def _job():
    return Job([1, 2, 3], Sampling())


def test_lone_request_waits_one_gap_at_most():
    batcher = _batcher(gap=0.01)
    batcher.submit(_job())
    started = time.perf_counter()
    assert len(batcher._next_batch()) == 1
    assert time.perf_counter() - started < 0.05


def test_late_companion_is_left_for_the_next_batch():
    batcher = _batcher(gap=0.01)
    batcher.submit(_job())
    timer = threading.Timer(0.05, lambda: batcher.submit(_job()))
    timer.start()
    assert len(batcher._next_batch()) == 1
    timer.join()


def test_request_still_tokenising_is_waited_for():
    batcher = _batcher(gap=0.01)
    batcher.submit(_job())

    def slow_arrival():
        with batcher.arriving():
            time.sleep(0.05)  # longer than the gap, shorter than ten gaps
        batcher.submit(_job())

    thread = threading.Thread(target=slow_arrival)
    with batcher.arriving():  # the thread below is "arriving" before collection starts
        thread.start()
        time.sleep(0.005)
    assert len(batcher._next_batch()) == 2
    thread.join()


def test_collection_stops_at_max_batch():
    batcher = _batcher(max_batch=3)
    for _ in range(5):
        batcher.submit(_job())
    assert len(batcher._next_batch()) == 3
    assert len(batcher._next_batch()) == 2
