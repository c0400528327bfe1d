"""`KeyedAppender`: records joining an open batch without `KafkaProducer.send`, at the seam of
kafka-python's own accumulator (real `RecordAccumulator` and batches, a stand-in producer shell).
Against a real broker (partitions, contents, order, a full batch sent at once):
tests/integration/test_bus.py."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.producer.record_accumulator import RecordAccumulator
from kafka.structs import TopicPartition

from rlhf.bus import KeyedAppender, KeyHashPartitioner, appends_directly

TOPIC = "t"


class CountingSender:
    def __init__(self) -> None:
        self.wakeups = 0

    def wakeup(self) -> None:
        self.wakeups += 1


def shell(partitions: int = 3, batch_size: int = 16384) -> Any:
    """What of a KafkaProducer the appender touches, around a real accumulator."""
    return SimpleNamespace(
        _accumulator=RecordAccumulator(batch_size=batch_size),
        _metadata=SimpleNamespace(_partitions={TOPIC: {p: object() for p in range(partitions)}}),
        _sender=CountingSender(),
        _transaction_manager=None,
        config={"partitioner": KeyHashPartitioner()},
    )


def expected_partition(producer: Any, key: bytes) -> int:
    cluster = SimpleNamespace(partitions_for_topic=lambda t: set(producer._metadata._partitions[t]))
    return KeyHashPartitioner().partition(TOPIC, None, key, None, b"", cluster)


def open_batch(producer: Any, key: bytes, value: bytes = b"first") -> TopicPartition:
    """Start the key's partition's batch the way send() does."""
    tp = TopicPartition(TOPIC, expected_partition(producer, key))
    producer._accumulator.append(tp, int(time.time() * 1000), key, value, None)
    return tp


def records_in(producer: Any, tp: TopicPartition) -> int:
    return sum(batch.records.next_offset() for batch in producer._accumulator._batches[tp])


def test_a_record_joins_the_open_batch_of_its_keys_partition() -> None:
    producer, appender = shell(partitions=5), KeyedAppender()
    keys = [f"prompt-digest-{n}".encode() for n in range(40)]
    tps = {key: open_batch(producer, key) for key in keys}
    before = {tp: records_in(producer, tp) for tp in set(tps.values())}
    futures = [appender.append(producer, TOPIC, key, b"value") for key in keys]
    assert all(future is not None for future in futures)
    for tp, count in before.items():
        joined = sum(1 for key in keys if tps[key] == tp)
        assert records_in(producer, tp) == count + joined
    assert producer._sender.wakeups == 0  # room left: the batch's linger decides
    assert producer._accumulator._appends_in_progress.get() == 0


@pytest.mark.parametrize("case", ["no metadata", "no open batch", "closed", "no room"])
def test_anything_else_is_left_to_send(case: str) -> None:
    producer, appender = shell(batch_size=200), KeyedAppender()
    tp = open_batch(producer, b"key")
    if case == "no metadata":
        producer._metadata._partitions.clear()
    elif case == "no open batch":
        producer._accumulator._batches[tp].clear()
    elif case == "closed":
        producer._accumulator.close()
    before = records_in(producer, tp)
    value = b"v" * (500 if case == "no room" else 5)
    assert appender.append(producer, TOPIC, b"key", value) is None
    assert records_in(producer, tp) == before
    assert producer._accumulator._appends_in_progress.get() == 0


def _exact_fill_size() -> int:
    """The batch size that one first record and one 40-byte record fill exactly."""
    producer = shell(batch_size=1 << 20)
    tp = open_batch(producer, b"key")
    producer._accumulator.append(tp, int(time.time() * 1000), b"key", b"x" * 40, None)
    return producer._accumulator._batches[tp][-1].records._builder.size()


@pytest.mark.parametrize(("queued", "wakes"), [(1, 1), (2, 0)])
def test_filling_the_partitions_only_batch_wakes_the_io_thread(queued: int, wakes: int) -> None:
    """As `wake_sender_once_per_batch` rules for send(): a batch that is full and alone is news;
    one behind an earlier queued batch is not (the I/O thread was woken for that one)."""
    producer, appender = shell(batch_size=_exact_fill_size()), KeyedAppender()
    tp = open_batch(producer, b"key")
    if queued == 2:  # an earlier batch still queued ahead of the open one
        producer._accumulator._batches[tp].appendleft(producer._accumulator._batches[tp][0])
    assert appender.append(producer, TOPIC, b"key", b"x" * 40) is not None
    assert producer._accumulator._batches[tp][-1].records.is_full()
    assert producer._sender.wakeups == wakes


def test_new_metadata_moves_keys_to_their_new_partitions() -> None:
    producer, appender = shell(partitions=2), KeyedAppender()
    key = next(
        k
        for k in (f"k{n}".encode() for n in range(100))
        if expected_partition(shell(partitions=2), k) != expected_partition(shell(partitions=7), k)
    )
    open_batch(producer, key)
    assert appender.append(producer, TOPIC, key, b"v") is not None
    producer._metadata._partitions = {TOPIC: {p: object() for p in range(7)}}  # as an update does
    moved = open_batch(producer, key)
    before = records_in(producer, moved)
    assert appender.append(producer, TOPIC, key, b"v") is not None
    assert records_in(producer, moved) == before + 1


def test_the_producer_kafka_python_builds_is_appended_to_directly() -> None:
    assert appends_directly(shell())


def _without_lock_method(producer: Any) -> None:
    """An accumulator that keeps its data but lost its `_tp_lock` (renamed, say)."""
    producer._accumulator = SimpleNamespace(**vars(producer._accumulator))


@pytest.mark.parametrize(
    "change",
    [
        _without_lock_method,
        lambda p: setattr(p._metadata, "_partitions", None),
        lambda p: setattr(p, "config", {"partitioner": object()}),  # not our key hash
        lambda p: setattr(
            p, "_transaction_manager", SimpleNamespace(is_transactional=lambda: True)
        ),
    ],
)
def test_any_other_producer_goes_through_send_and_says_so(
    change: Any, caplog: pytest.LogCaptureFixture
) -> None:
    producer = shell()
    change(producer)
    with caplog.at_level(logging.WARNING, logger="rlhf.bus"):
        assert not appends_directly(producer)
    assert "every record goes through send()" in caplog.text
