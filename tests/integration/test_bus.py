"""The Kafka bus against a real embedded Tansu broker: delivery, commits, dead letters, outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaProducer

from rlhf import bus
from rlhf.broker import BrokerError, EmbeddedBroker, free_port
from rlhf.v1 import events_pb2

# Tansu holds JoinGroup for the rebalance timeout (= max_poll_interval_ms): keep it short.
GROUP_SETTINGS = {"max_poll_interval_ms": 1000, "session_timeout_ms": 6000}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("tansu") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as embedded:
        bus.ensure_topics(embedded.bootstrap)
        yield embedded


@pytest.fixture
def publisher(broker: EmbeddedBroker) -> Iterator[bus.Publisher]:
    pub = bus.Publisher(broker.bootstrap, client_id="test-bus")
    yield pub
    pub.close()


def make_topic(bootstrap: str, partitions: int = 3) -> str:
    """A fresh topic per test, so tests never see each other's records."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics({name: {"num_partitions": partitions, "replication_factor": 1}})
    finally:
        admin.close()
    return name


def generation(gid: str) -> events_pb2.GenerationEvent:
    return events_pb2.GenerationEvent(generation_id=gid, prompt="p", response=f"r-{gid}")


def poll_until(consumer: bus.EventConsumer, count: int, timeout: float = 20.0) -> list[bus.Record]:
    """Poll until at least `count` records arrived (fails the test on timeout)."""
    records: list[bus.Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < count:
        assert time.monotonic() < deadline, f"got {len(records)}/{count} records in {timeout}s"
        records.extend(consumer.poll(timeout=0.2))
    return records


def drain(consumer: bus.EventConsumer, seconds: float) -> list[bus.Record]:
    """Everything the consumer returns within `seconds`."""
    records: list[bus.Record] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        records.extend(consumer.poll(timeout=0.2))
    return records


def group_consumer(broker: EmbeddedBroker, topic: str, group: str) -> bus.EventConsumer:
    return bus.EventConsumer(
        broker.bootstrap,
        {topic: events_pb2.GenerationEvent},
        group_id=group,
        client_id="test-bus",
        **GROUP_SETTINGS,
    )


def test_ensure_topics_is_idempotent(broker: EmbeddedBroker) -> None:
    bus.ensure_topics(broker.bootstrap)
    bus.ensure_topics(broker.bootstrap, partitions=5)  # existing topics are left alone
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert set(bus.ALL_TOPICS) <= set(admin.list_topics())
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(bus.ALL_TOPICS)}
    finally:
        admin.close()
    assert described[bus.POLICY_CHECKPOINTS] == 1
    assert described[bus.REWARD_CHECKPOINTS] == 1
    assert described[bus.GENERATIONS] == 3
    assert described[bus.FEEDBACK] == 3


def test_publish_returns_position_and_consumer_decodes(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    topic = make_topic(broker.bootstrap)
    partition, offset = publisher.publish(
        topic, "gen-1", generation("gen-1"), headers=[("trace", b"abc")]
    )
    assert 0 <= partition < 3
    assert offset == 0
    with bus.EventConsumer(broker.bootstrap, {topic: events_pb2.GenerationEvent}, None) as consumer:
        [record] = poll_until(consumer, 1)
        consumer.commit()  # no group: a no-op, not an error
    assert (record.topic, record.partition, record.offset) == (topic, partition, offset)
    assert record.key == "gen-1"
    assert record.message == generation("gen-1")
    assert record.headers == (("trace", b"abc"),)
    assert record.timestamp_ms > 0


def test_same_key_same_partition(broker: EmbeddedBroker, publisher: bus.Publisher) -> None:
    topic = make_topic(broker.bootstrap)
    positions = [publisher.publish(topic, "same-key", generation(str(i))) for i in range(5)]
    assert len({p for p, _ in positions}) == 1
    assert [o for _, o in positions] == list(range(5))
    futures = [publisher.publish_async(topic, "same-key", generation(str(i))) for i in range(5)]
    publisher.flush(5)
    assert {f.get(5).partition for f in futures} == {positions[0][0]}


def _count_wakeups(producer: KafkaProducer) -> list[int]:
    """Count the wake-ups `producer.send` gives its I/O thread from now on."""
    count = [0]
    wake = producer._sender.wakeup

    def counting() -> None:
        count[0] += 1
        wake()

    producer._sender.wakeup = counting
    return count


def _count_sends(producer: KafkaProducer) -> list[int]:
    """Count the calls of `producer.send` from now on."""
    count = [0]
    send = producer.send

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return send(*args, **kwargs)

    producer.send = counting  # type: ignore[method-assign]
    return count


def test_a_batch_filled_by_direct_appends_is_sent_without_waiting_out_linger(
    broker: EmbeddedBroker,
) -> None:
    """Records appended past send() (KeyedAppender) fill a batch as send's would: the record that
    no longer fits starts the next batch through send, and the full one goes out at once, not
    after linger_ms."""
    topic = make_topic(broker.bootstrap, partitions=1)
    with bus.Publisher(
        broker.bootstrap, client_id="test-linger", linger_ms=30_000, delivery_timeout_ms=60_000
    ) as publisher:
        producer = publisher._current()
        sends = _count_sends(producer)
        event = events_pb2.GenerationEvent(generation_id="g", response="r" * 1000)
        futures = []
        while sends[0] < 2:  # the second send starts the second batch: the first is full
            futures.append(publisher.publish_async(topic, "k", event))
        assert len(futures) > 3  # records between the two sends were appended directly
        assert futures[0].get(timeout=10).offset == 0  # long before the 30 s linger


def test_a_burst_wakes_the_producer_per_batch_not_per_record(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    """kafka-python wakes its I/O thread for nearly every record of a burst (the check on a stock
    producer below); the bus's producer only for new batches, and loses nothing by it."""
    topic, count = make_topic(broker.bootstrap), 4000
    # Records of a feedback event's size: a 16 KiB batch holds ~60, so a burst queues batches.
    events = [
        (f"key-{n % 7}", events_pb2.GenerationEvent(generation_id=str(n), response="r" * 250))
        for n in range(count)
    ]
    stock = KafkaProducer(
        bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    try:
        stock.send(topic, key=b"warm-up", value=b"").get(10)
        stock_wakeups = _count_wakeups(stock)
        for key, event in events:
            stock.send(topic, key=key.encode(), value=event.SerializeToString())
        stock.flush(30)
    finally:
        stock.close(5)
    publisher.publish(topic, "warm-up", generation("warm-up"))
    producer = publisher._current()
    wakeups = _count_wakeups(producer)
    sends = _count_sends(producer)
    futures = [publisher.publish_async(topic, key, event) for key, event in events]
    publisher.flush(30)
    stored = [future.get(0) for future in futures]
    assert stock_wakeups[0] > count / 2  # the premise: drop the shim when this fails
    assert wakeups[0] < stock_wakeups[0] / 5
    # Records joining an open batch skip send() (KeyedAppender): it only starts batches.
    assert 0 < sends[0] < count / 20
    with bus.EventConsumer(broker.bootstrap, {topic: events_pb2.GenerationEvent}, None) as consumer:
        records = poll_until(consumer, 2 * count + 2)
    ours = {(r.partition, r.offset): r for r in records}
    for (key, event), metadata in zip(events, stored, strict=True):
        record = ours[(metadata.partition, metadata.offset)]
        assert (record.key, record.message) == (key, event)
    # Each key in the partition kafka-python's own partitioner gave the stock producer's records.
    mine = {(m.partition, m.offset) for m in stored}
    stock_partitions = {r.key: r.partition for r in records if (r.partition, r.offset) not in mine}
    for (key, _), metadata in zip(events, stored, strict=True):
        assert metadata.partition == stock_partitions[key]
    for key in {key for key, _ in events}:  # each key's records in the order they were sent
        offsets = [m.offset for (k, _), m in zip(events, stored, strict=True) if k == key]
        assert offsets == sorted(offsets)


def test_committed_records_are_not_redelivered(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    topic, group = make_topic(broker.bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    for i in range(6):
        publisher.publish(topic, f"k{i}", generation(f"old-{i}"))
    with group_consumer(broker, topic, group) as first:
        assert len(poll_until(first, 6)) == 6
        first.commit()
    publisher.publish(topic, "k-new", generation("new"))
    with group_consumer(broker, topic, group) as second:
        records = poll_until(second, 1) + drain(second, 1.0)
    assert [r.message.generation_id for r in records] == ["new"]


def test_uncommitted_records_are_redelivered(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    topic, group = make_topic(broker.bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    expected = {f"gen-{i}" for i in range(6)}
    for gid in sorted(expected):
        publisher.publish(topic, gid, generation(gid))
    with group_consumer(broker, topic, group) as first:
        assert {r.message.generation_id for r in poll_until(first, 6)} == expected
    with group_consumer(broker, topic, group) as second:
        assert {r.message.generation_id for r in poll_until(second, 6)} == expected


def test_range_assignment_gives_a_member_the_same_partition_of_both_topics(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    """Two members split two 2-partition topics: each holds partition p of both (so a
    generation and its feedback, equal keys, meet in one member), and a member joining after a
    commit continues from the committed offsets."""
    generations, feedback = make_topic(broker.bootstrap, 2), make_topic(broker.bootstrap, 2)
    group = f"g-{uuid.uuid4().hex[:8]}"
    for i in range(4):
        publisher.publish(generations, f"k{i}", generation(f"g{i}"))
        publisher.publish(feedback, f"k{i}", generation(f"f{i}"))
    topics = {generations: events_pb2.GenerationEvent, feedback: events_pb2.GenerationEvent}

    def member(name: str) -> bus.EventConsumer:
        return bus.EventConsumer(
            broker.bootstrap, topics, group_id=group, client_id=name, **GROUP_SETTINGS
        )

    with member("first") as first:
        assert len(poll_until(first, 8)) == 8
        first.commit()
        publisher.publish(feedback, "k-new", generation("f-new"))
        records: list[bus.Record] = []
        with member("second") as second:
            # Each member polls in its own thread, as services do: a member that stops polling
            # for max_poll_interval_ms (one polling the other) leaves and restarts the rebalance.
            stop = threading.Event()

            def keep_polling(consumer: bus.EventConsumer) -> None:
                while not stop.is_set():
                    records.extend(consumer.poll(timeout=0.2))

            threads = [threading.Thread(target=keep_polling, args=(c,)) for c in (first, second)]
            for thread in threads:
                thread.start()
            try:
                deadline = time.monotonic() + 60
                while True:
                    mine, theirs = first.assignment(), second.assignment()
                    settled = bool(mine and theirs) and mine.isdisjoint(theirs)
                    if settled and {r.message.generation_id for r in records} >= {"f-new"}:
                        break
                    assert time.monotonic() < deadline, f"not settled: {mine} {theirs} {records}"
                    time.sleep(0.1)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(10)
            # Range assignment: each member holds the same partition number of both topics.
            assert {p for _, p in first.assignment()} in ({0}, {1})
            assert len(first.assignment()) == len(second.assignment()) == 2
    # Only what came after the commit was read again.
    assert {r.message.generation_id for r in records} == {"f-new"}


def test_ensure_topics_refuses_mismatched_partition_counts() -> None:
    with EmbeddedBroker() as embedded:
        admin = KafkaAdminClient(bootstrap_servers=embedded.bootstrap)
        try:
            admin.create_topics(
                {
                    bus.GENERATIONS: {"num_partitions": 3, "replication_factor": 1},
                    bus.FEEDBACK: {"num_partitions": 5, "replication_factor": 1},
                }
            )
        finally:
            admin.close()
        started = time.monotonic()
        with pytest.raises(bus.PartitionMismatch, match="3.*5"):
            bus.ensure_topics(embedded.bootstrap, timeout=20)
        assert time.monotonic() - started < 10  # not retried as if the broker were down


def test_garbage_goes_to_dead_letter_and_consumer_continues(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    topic = make_topic(broker.bootstrap, partitions=1)
    garbage = b"\x00this is not a protobuf \xff"
    publisher.publish(topic, "before", generation("before"))
    raw = KafkaProducer(bootstrap_servers=broker.bootstrap)
    raw.send(topic, key=b"bad", value=garbage).get(5)
    raw.close()
    publisher.publish(topic, "after", generation("after"))

    topics = {topic: events_pb2.GenerationEvent}
    with bus.EventConsumer(broker.bootstrap, topics, None, dead_letters=publisher) as consumer:
        records = poll_until(consumer, 2)
        assert consumer.dead_lettered == 1
    assert [(r.offset, r.key) for r in records] == [(0, "before"), (2, "after")]

    letters = {bus.DEAD_LETTER: events_pb2.DeadLetter}
    with bus.EventConsumer(broker.bootstrap, letters, None) as dlq:
        deadline = time.monotonic() + 10
        mine: list[events_pb2.DeadLetter] = []
        while not mine and time.monotonic() < deadline:
            mine = [r.message for r in dlq.poll(0.2) if r.message.source_topic == topic]
    assert len(mine) == 1
    letter = mine[0]
    assert (letter.partition, letter.offset, letter.key, letter.value) == (0, 1, b"bad", garbage)
    assert "DecodeError" in letter.reason
    assert letter.failed_at.seconds > 0


def test_record_is_not_skipped_when_dead_letter_publish_fails(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    topic = make_topic(broker.bootstrap, partitions=1)
    publisher.publish(topic, "before", generation("before"))
    raw = KafkaProducer(bootstrap_servers=broker.bootstrap)
    raw.send(topic, key=b"bad", value=b"\x00garbage").get(5)
    raw.close()
    publisher.publish(topic, "after", generation("after"))
    nowhere = bus.Publisher(f"127.0.0.1:{free_port()}", client_id="test-nowhere", max_block_ms=300)

    topics = {topic: events_pb2.GenerationEvent}
    with bus.EventConsumer(broker.bootstrap, topics, None, dead_letters=nowhere) as consumer:
        seen: list[str] = []
        with pytest.raises(bus.BusUnavailable):
            for _ in range(50):
                seen += [r.message.generation_id for r in consumer.poll(0.2)]
        assert "after" not in seen and consumer.dead_lettered == 0
        consumer.dead_letters = publisher
        while "after" not in seen:
            seen += [r.message.generation_id for r in poll_until(consumer, 1)]
        assert consumer.dead_lettered == 1
    assert set(seen) == {"before", "after"}
    nowhere.close(0)


def test_poison_record_is_dead_lettered_and_the_next_one_handled(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    """A record that decodes but whose handler raises: dead-lettered with the reason, and the
    records after it in the same poll are handled as usual."""
    topic = make_topic(broker.bootstrap, partitions=1)
    for name in ("first", "poison", "next", "last"):
        publisher.publish(topic, name, generation(name))
    handled: list[str] = []

    def handle(record: bus.Record) -> None:
        if record.message.generation_id == "poison":
            raise RuntimeError("cannot handle this one")
        handled.append(record.message.generation_id)

    topics = {topic: events_pb2.GenerationEvent}
    with bus.EventConsumer(broker.bootstrap, topics, None, dead_letters=publisher) as consumer:
        records = poll_until(consumer, 4)
        assert consumer.dispatch(records, handle) == 3
        assert consumer.dead_lettered == 1
        assert consumer.positions() == {(topic, 0): 4}
    assert handled == ["first", "next", "last"]
    letters = {bus.DEAD_LETTER: events_pb2.DeadLetter}
    with bus.EventConsumer(broker.bootstrap, letters, None) as dlq:
        deadline = time.monotonic() + 10
        mine: list[events_pb2.DeadLetter] = []
        while not mine and time.monotonic() < deadline:
            mine = [r.message for r in dlq.poll(0.2) if r.message.source_topic == topic]
    assert len(mine) == 1
    letter = mine[0]
    assert (letter.offset, letter.key) == (1, b"poison")
    assert events_pb2.GenerationEvent.FromString(letter.value).generation_id == "poison"
    assert "handler failed: RuntimeError: cannot handle this one" in letter.reason


def test_poison_record_is_read_again_when_it_cannot_be_dead_lettered(
    broker: EmbeddedBroker, publisher: bus.Publisher
) -> None:
    topic = make_topic(broker.bootstrap, partitions=1)
    for name in ("first", "poison", "next"):
        publisher.publish(topic, name, generation(name))
    nowhere = bus.Publisher(f"127.0.0.1:{free_port()}", client_id="test-nowhere", max_block_ms=300)
    handled: list[str] = []

    def handle(record: bus.Record) -> None:
        if record.message.generation_id == "poison":
            raise RuntimeError("poison")
        handled.append(record.message.generation_id)

    topics = {topic: events_pb2.GenerationEvent}
    with bus.EventConsumer(broker.bootstrap, topics, None, dead_letters=nowhere) as consumer:
        with pytest.raises(bus.BusUnavailable):
            consumer.dispatch(poll_until(consumer, 3), handle)
        assert handled == ["first"] and consumer.positions() == {(topic, 0): 1}
        consumer.dead_letters = publisher
        again = poll_until(consumer, 2)  # from the poison record on, not lost
        assert [r.message.generation_id for r in again] == ["poison", "next"]
        consumer.dispatch(again, handle)
    assert handled == ["first", "next"]
    nowhere.close(0)


def test_publish_against_stopped_broker_fails_fast() -> None:
    embedded = EmbeddedBroker()
    embedded.start()
    bus.ensure_topics(embedded.bootstrap)
    connected = bus.Publisher(embedded.bootstrap, client_id="test-down")
    connected.publish(bus.FEEDBACK, "k", generation("up"))
    embedded.stop()
    assert not embedded.is_running()
    try:
        for pub in (connected, bus.Publisher(embedded.bootstrap, client_id="test-fresh")):
            started = time.monotonic()
            with pytest.raises(bus.BusUnavailable):
                pub.publish(bus.FEEDBACK, "k", generation("down"), timeout=5.0)
            assert time.monotonic() - started < 10.0
            pub.close(0)
    finally:
        embedded.stop()


def test_broker_restart_on_same_port(tmp_path: Path) -> None:
    port = free_port()
    embedded = EmbeddedBroker(port=port, log_path=tmp_path / "restart.log", create_topics=True)
    publisher = bus.Publisher(embedded.bootstrap, client_id="test-restart")
    try:
        embedded.start()
        publisher.publish(bus.GENERATIONS, "k", generation("first-life"))
        embedded.stop()
        embedded.start()  # memory storage: topics recreated, old data gone
        assert embedded.is_running() and embedded.bootstrap == f"127.0.0.1:{port}"
        partition, offset = publisher.publish(bus.GENERATIONS, "k", generation("second-life"))
        assert offset == 0
        topics = {bus.GENERATIONS: events_pb2.GenerationEvent}
        with bus.EventConsumer(embedded.bootstrap, topics, None) as consumer:
            [record] = poll_until(consumer, 1)
        assert (record.partition, record.message.generation_id) == (partition, "second-life")
    finally:
        publisher.close(1)
        embedded.stop()


def test_start_on_busy_port_fails_clearly(broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(port=broker.port).start(timeout=5)


def test_cli_serves_topics_until_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf.broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"127.0.0.1:{port}"
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        assert set(bus.ALL_TOPICS) <= set(admin.list_topics())
        admin.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
