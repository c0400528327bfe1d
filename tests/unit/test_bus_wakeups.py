"""Which of kafka-python's per-record wake-ups the bus keeps (`wake_sender_once_per_batch`):
the rule at the accumulator seam. A burst against a real broker: tests/integration/test_bus.py."""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from types import SimpleNamespace
from typing import Any

import pytest

from rlhf.bus import wake_sender_once_per_batch

TP = ("topic", 0)


class FakeAccumulator:
    """Answers each append with the next scripted (batch_is_full, new_batch_created) and the
    partition's queue length kafka-python would then have."""

    def __init__(self, script: list[tuple[bool, bool, int]]) -> None:
        self._script = list(script)
        self._batches: defaultdict[Any, deque[object]] = defaultdict(deque)

    def append(self, tp: Any, *args: Any, **kwargs: Any) -> tuple[Any, bool, bool, bool]:
        full, new, queued = self._script.pop(0)
        self._batches[tp] = deque(range(queued))
        return "future", full, new, False


@pytest.mark.parametrize(
    ("full", "new", "queued", "wakes"),
    [
        (False, True, 1, True),  # a new batch: the I/O thread must learn of it
        (True, True, 2, True),  # a new batch behind a full one
        (True, False, 1, True),  # the partition's only batch just filled: send it now
        (True, False, 2, False),  # "full" only because a batch is queued: already woken for it
        (True, False, 7, False),
        (False, False, 1, False),  # room left in the only batch: its linger decides
    ],
)
def test_wakes_only_for_news(full: bool, new: bool, queued: int, wakes: bool) -> None:
    accumulator = FakeAccumulator([(full, new, queued)])
    producer = SimpleNamespace(_accumulator=accumulator)
    assert wake_sender_once_per_batch(producer)  # type: ignore[arg-type]
    future, batch_is_full, new_batch_created, abort = accumulator.append(TP, 0, b"k", b"v", None)
    assert future == "future" and new_batch_created is new and abort is False
    assert (batch_is_full or new_batch_created) is wakes


def test_an_unexpected_producer_is_left_alone_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = SimpleNamespace(_accumulator=SimpleNamespace(append=lambda *a: None))
    original = producer._accumulator.append
    with caplog.at_level(logging.WARNING, logger="rlhf.bus"):
        assert not wake_sender_once_per_batch(producer)  # type: ignore[arg-type]
    assert producer._accumulator.append is original
    assert "wakes its I/O thread per record" in caplog.text
