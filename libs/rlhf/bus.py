"""The one Kafka wrapper of the platform: topic names, a publisher and a protobuf event consumer.

Every service goes through this module so delivery guarantees are decided in one place:

* publishing is acknowledged by the broker (acks=all) before `Publisher.publish` returns, and a
  dead broker makes it fail fast with `BusUnavailable` instead of hanging or silently buffering;
* generations and feedback are keyed alike (`rlhf.ids.partition_key`: the prompt digest) on two
  topics of equal partition count, and a consumer group assigns partition p of both topics to one
  member (range assignment), so a member holds everything a join of its partitions needs;
* consuming is at-least-once: offsets are committed only when the caller says its processing is
  durable (`EventConsumer.commit`), and a record that cannot be decoded, or whose handling fails
  (`EventConsumer.dispatch`), is parked on the dead-letter topic with the reason before it is
  skipped, so nothing is lost silently and one poison record never stops the records after it.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import (
    CommitFailedError,
    InvalidProducerEpochError,
    KafkaError,
    OutOfOrderSequenceNumberError,
    ProducerFencedError,
    UnknownProducerIdError,
)
from kafka.partitioner import DefaultPartitioner
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

from rlhf.config import KafkaSettings
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

GENERATIONS = "rlhf.generations.v1"
FEEDBACK = "rlhf.feedback.v1"
POLICY_CHECKPOINTS = "rlhf.checkpoints.policy.v1"
REWARD_CHECKPOINTS = "rlhf.checkpoints.reward.v1"
DEAD_LETTER = "rlhf.deadletter.v1"
RELEASES = "rlhf.releases.v1"  # which policy versions answer users (events_pb2.ReleaseEvent)
ALL_TOPICS: tuple[str, ...] = (
    GENERATIONS,
    FEEDBACK,
    POLICY_CHECKPOINTS,
    REWARD_CHECKPOINTS,
    DEAD_LETTER,
    RELEASES,
)
# Checkpoint events must be totally ordered (version N+1 after N), hence one partition; they are
# tiny and rare, so keep them forever: a new serving pod can always find the latest checkpoint.
_SINGLE_PARTITION_TOPICS: dict[str, dict[str, str]] = {
    POLICY_CHECKPOINTS: {"retention.ms": "-1"},
    REWARD_CHECKPOINTS: {"retention.ms": "-1"},
    RELEASES: {"retention.ms": "-1"},  # one partition: every replica applies them in one order
}
# Topics a consumer joins by key: they must have one partition count (see check_copartitioned).
JOINED_TOPICS: tuple[str, ...] = (GENERATIONS, FEEDBACK)
_TOPIC_ALREADY_EXISTS = 36
# Errors meaning the broker rejected the record because it forgot or fenced our idempotent
# producer id (e.g. an in-memory broker restarted). Nothing was written, so a fresh producer may
# safely resend once.
_STALE_PRODUCER_ERRORS = (
    UnknownProducerIdError,
    OutOfOrderSequenceNumberError,
    InvalidProducerEpochError,
    ProducerFencedError,
)
_CONNECT_TIMEOUT_MS = 10_000
# How every Kafka client of this process connects (TLS, SASL): one cluster per process.
_security: dict[str, Any] = {}


def configure(settings: KafkaSettings) -> None:
    """Connect every Kafka client this process makes from now on as `settings` say
    (RLHF_KAFKA_SECURITY_PROTOCOL, SASL and SSL files). Plaintext until called."""
    global _security
    _security = settings.client_options()


def client_options() -> dict[str, Any]:
    """The security keyword arguments of every KafkaProducer, KafkaConsumer and admin client
    (`configure`); also for tools that make their own clients (`rlhf.topics_cli`)."""
    return dict(_security)


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 key hash (org.apache.kafka.common.utils.Utils.murmur2), as kafka-python
    computes it, but reading the key as little-endian 32-bit words at once: twice as fast.
    (Masking to 32 bits distributes over XOR, so one mask per step is enough.)"""
    m, mask, length = 0x5BD1E995, 0xFFFFFFFF, len(data)
    h = 0x9747B28C ^ length
    words = length // 4
    for k in struct.unpack_from(f"<{words}I", data):
        k = (k * m) & mask
        h = ((h * m) ^ ((k ^ (k >> 24)) * m)) & mask
    tail = length - words * 4
    if tail:
        h ^= int.from_bytes(data[words * 4 :], "little")
        h = (h * m) & mask
    h = ((h ^ (h >> 13)) * m) & mask
    return h ^ (h >> 15)


class KeyHashPartitioner(DefaultPartitioner):
    """kafka-python's default partitioning, with the faster murmur2.

    The partition must stay exactly the default one (that of the Java client too): a generation
    and the feedback on it are keyed by the same id so that they share a partition.
    """

    def partition(
        self,
        topic: str,
        key: Any,
        serialized_key: bytes | None,
        value: Any,
        serialized_value: bytes | None,
        cluster: Any,
    ) -> int:
        partitions = cluster.partitions_for_topic(topic)
        if serialized_key is None or not partitions:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        return sorted(partitions)[key_slot(serialized_key, len(partitions))]


def key_slot(serialized_key: bytes, partitions: int) -> int:
    """Where a key goes among a topic's `partitions` partitions in ascending order: Kafka's
    default for keyed records (positive murmur2 modulo the count)."""
    return (murmur2(serialized_key) & 0x7FFFFFFF) % partitions


def wake_sender_once_per_batch(producer: KafkaProducer) -> bool:
    """Stop `producer` waking its I/O thread for every record sent behind a queued batch.

    kafka-python (3.0, like the Java client) wakes the producer's I/O thread whenever the
    accumulator calls a partition "full", and it does so for every record appended while an
    earlier batch of that partition is still queued. Those wake-ups say nothing new: the I/O
    thread was woken when that later batch was created, and after sending anything it loops
    again at once. In Python each one costs the sending thread a system call and the I/O thread
    a pass of its loop under the interpreter lock. In a burst nearly every record woke it
    (59.5k wake-ups for 60k records), which halved a bare producer's throughput on this machine
    (about 13.5k against 23k events/s, acks=all). The wake-ups that carry news are kept: a new
    batch, and a partition's only batch becoming full.

    Returns False, changing nothing, if the producer is not built as this expects.
    """
    accumulator = getattr(producer, "_accumulator", None)
    append = getattr(accumulator, "append", None)
    batches = getattr(accumulator, "_batches", None)
    if append is None or not isinstance(batches, dict):
        log.warning("kafka-python's producer changed shape: it wakes its I/O thread per record")
        return False

    def append_waking_once(tp: TopicPartition, *args: Any, **kwargs: Any) -> Any:
        future, batch_is_full, new_batch_created, abort_for_new_batch = append(tp, *args, **kwargs)
        if batch_is_full and not new_batch_created:
            # Full only because an earlier batch is queued: the I/O thread knows of it.
            batch_is_full = len(batches.get(tp, ())) <= 1
        return future, batch_is_full, new_batch_created, abort_for_new_batch

    accumulator.append = append_waking_once
    return True


def appends_directly(producer: KafkaProducer) -> bool:
    """Whether `KeyedAppender` can append to `producer`'s open batches: True for the producer
    kafka-python 3.0 builds (non-transactional, as `Publisher` makes it), False when its
    internals are not shaped as `KeyedAppender` expects (then every record goes through
    `send`)."""
    accumulator = getattr(producer, "_accumulator", None)
    manager = getattr(producer, "_transaction_manager", None)
    shaped = (
        isinstance(getattr(accumulator, "_batches", None), dict)
        and callable(getattr(accumulator, "_tp_lock", None))
        and hasattr(accumulator, "_closed")
        and callable(getattr(getattr(accumulator, "_appends_in_progress", None), "increment", None))
        and isinstance(getattr(getattr(producer, "_metadata", None), "_partitions", None), dict)
        and callable(getattr(getattr(producer, "_sender", None), "wakeup", None))
        and isinstance(getattr(producer, "config", None), dict)
        and isinstance(producer.config.get("partitioner"), KeyHashPartitioner)
        and (manager is None or not manager.is_transactional())
    )
    if not shaped:
        log.warning("kafka-python's producer changed shape: every record goes through send()")
    return shaped


class KeyedAppender:
    """Appends a keyed record to its partition's open batch the way `KafkaProducer.send` does,
    in half of send's time.

    `send` spends about 23 us of the caller's interpreter time per record on this machine:
    argument and size checks, a metadata lookup, a partition list sorted anew, a debug log line
    formatted whether logged or not, and the accumulator's own locking. Most records of a busy
    producer land in an open batch of their partition. For those this does only what that takes:
    the same partition (`KeyHashPartitioner`, the Java client's), the partition's lock, the
    batch's `try_append`, and the I/O thread woken when that batch fills up. The record, its
    future and its acknowledgement are the producer's own. Everything else (no open batch with
    room, no metadata for the topic yet, a closing producer) returns None, and the caller uses
    `send`, which does the full work and starts new batches.
    """

    def __init__(self) -> None:
        # topic -> (the metadata's partition dict it was built from, its TopicPartitions).
        self._partitions: dict[str, tuple[dict, list[TopicPartition]]] = {}

    def _topic_partitions(self, producer: KafkaProducer, topic: str) -> list[TopicPartition]:
        known = producer._metadata._partitions.get(topic)
        if not known:
            return []
        cached = self._partitions.get(topic)
        if cached is not None and cached[0] is known:  # metadata updates replace the dict
            return cached[1]
        ordered = [TopicPartition(topic, p) for p in sorted(known)]
        self._partitions[topic] = (known, ordered)
        return ordered

    def append(
        self, producer: KafkaProducer, topic: str, key: bytes, value: bytes
    ) -> FutureRecordMetadata | None:
        """The record's future, or None: not appended, `send` it."""
        partitions = self._topic_partitions(producer, topic)
        accumulator = producer._accumulator
        if not partitions or accumulator._closed:
            return None
        tp = partitions[key_slot(key, len(partitions))]
        in_progress = accumulator._appends_in_progress  # what closing waits for
        in_progress.increment()
        try:
            with accumulator._tp_lock(tp):
                batches = accumulator._batches.get(tp)
                if not batches:
                    return None
                last = batches[-1]
                future = last.try_append(
                    int(time.time() * 1000), key, value, None, time.monotonic()
                )
                if future is not None and len(batches) == 1 and last.records.is_full():
                    producer._sender.wakeup()  # as wake_sender_once_per_batch: news only
                return future
        finally:
            in_progress.decrement()


class BusUnavailable(Exception):
    """The broker did not acknowledge in time (down, unreachable or refusing our requests)."""


class PartitionMismatch(Exception):
    """The generations and feedback topics exist with different partition counts.

    Not transient: equal keys would land in different partition numbers on the two topics, so a
    consumer owning some partitions could not join what it reads. An operator must fix the topics.
    """


def topic_specs(partitions: int) -> dict[str, dict[str, Any]]:
    """The CreateTopics request body for every platform topic: which topics exist, their
    partition counts (`partitions`, or one for the checkpoint topics) and topic configs, with
    replication factor 1. `rlhf.topics_cli` adds a production cluster's durability settings."""
    specs: dict[str, dict[str, Any]] = {}
    for topic in ALL_TOPICS:
        configs = _SINGLE_PARTITION_TOPICS.get(topic)
        specs[topic] = {
            "num_partitions": 1 if configs is not None else partitions,
            "replication_factor": 1,
            "configs": dict(configs or {}),
        }
    return specs


def _create_topics_once(bootstrap: str, partitions: int, timeout_ms: int) -> None:
    """One attempt at creating the topics; already-existing topics count as success."""
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="rlhf-ensure-topics",
        bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=timeout_ms,
        **client_options(),
    )
    try:
        result = admin.create_topics(
            topic_specs(partitions), timeout_ms=timeout_ms, raise_errors=False
        )
        failed = [
            f"{t['name']}: {t['error_code']} {t.get('error_message')}"
            for t in result["topics"]
            if t["error_code"] not in (0, _TOPIC_ALREADY_EXISTS)
        ]
        if failed:
            raise BusUnavailable(f"Could not create topics: {'; '.join(failed)}")
        missing = set(ALL_TOPICS) - set(admin.list_topics())
        if missing:
            raise BusUnavailable(f"Topics not visible after creation: {sorted(missing)}")
        # Creation leaves existing topics alone, so topics made elsewhere may still differ.
        counts = {
            t.get("topic", t.get("name")): len(t["partitions"])
            for t in admin.describe_topics([GENERATIONS, FEEDBACK])
            if t.get("error_code", 0) == 0
        }
        check_copartitioned(counts)
    finally:
        with contextlib.suppress(Exception):
            admin.close()


def check_copartitioned(counts: dict[str, int], topics: tuple[str, ...] = JOINED_TOPICS) -> None:
    """Raise PartitionMismatch unless every topic of `topics` has the same partition count
    (`counts`: partitions per topic name; a topic missing from it is not checked)."""
    found = {topic: counts[topic] for topic in topics if topic in counts}
    if len(set(found.values())) > 1:
        shown = ", ".join(f"{topic} has {n}" for topic, n in found.items())
        raise PartitionMismatch(
            f"Partition counts differ ({shown}): a generation and the feedback on it would land in "
            "different partition numbers; recreate the topics with one count"
        )


def ensure_topics(bootstrap: str, partitions: int = 3, timeout: float = 30.0) -> None:
    """Create all platform topics if missing; safe to call from every service at startup.

    Retries until `timeout` so callers can race the broker's own startup. Producers and consumers
    here never auto-create topics (that would give the wrong partition count), so this is the only
    place topics come from. Raises PartitionMismatch (at once) if generations and feedback exist
    with different partition counts.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            _create_topics_once(bootstrap, partitions, max(500, int(min(remaining, 10.0) * 1000)))
            return
        except (KafkaError, OSError, BusUnavailable) as exc:
            if time.monotonic() + 0.2 >= deadline:
                raise BusUnavailable(f"ensure_topics({bootstrap}) failed: {exc}") from exc
            log.info("ensure_topics: broker not ready (%s); retrying", exc)
            time.sleep(0.2)


def _discard_producer(producer: KafkaProducer, grace_s: float) -> None:
    """Close a producer we stopped using, in the background.

    kafka-python's close() refuses to finish while batches are incomplete, and those complete at
    the latest when they expire after delivery_timeout_ms; so give it that long, off the caller's
    thread, and let in-flight async records still be delivered if the broker answers.
    """

    def _close() -> None:
        for timeout in (grace_s, 0.0):
            try:
                producer.close(timeout=timeout)
                return
            except Exception as exc:
                log.debug("Closing a discarded producer: %s", exc)

    threading.Thread(target=_close, name="rlhf-producer-discard", daemon=True).start()


class Publisher:
    """Publishes protobuf events and reports success only once the broker has acknowledged them.

    The underlying KafkaProducer is idempotent (no duplicates from its own retries) and is
    replaced after any failure, because an idempotent producer that lost its producer id (broker
    restart) stays broken forever. Thread-safe.
    """

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        max_block_ms: int = 2000,
        delivery_timeout_ms: int = 5000,
        linger_ms: int = 5,
    ) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.max_block_ms = max_block_ms
        self.delivery_timeout_ms = delivery_timeout_ms
        self.linger_ms = linger_ms
        self._lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._broken = False
        self._closed = False
        self._appender = KeyedAppender()
        self._appends_directly = False  # set with the first producer: kafka-python's shape

    def _new_producer(self) -> KafkaProducer:
        """A producer whose every wait is bounded, so a dead broker surfaces within seconds."""
        request_timeout_ms = max(500, self.delivery_timeout_ms - self.linger_ms)
        try:
            producer = KafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=True,
                linger_ms=self.linger_ms,
                retries=5,
                retry_backoff_ms=100,
                max_block_ms=self.max_block_ms,
                bootstrap_timeout_ms=self.max_block_ms,
                delivery_timeout_ms=self.delivery_timeout_ms,
                request_timeout_ms=request_timeout_ms,
                reconnect_backoff_max_ms=1000,
                allow_auto_create_topics=False,
                partitioner=KeyHashPartitioner(),
                **client_options(),
            )
        except (KafkaError, OSError) as exc:
            raise BusUnavailable(f"Cannot connect to Kafka at {self.bootstrap}: {exc}") from exc
        wake_sender_once_per_batch(producer)
        self._appends_directly = appends_directly(producer)
        return producer

    def _current(self) -> KafkaProducer:
        """The live producer, (re)created if there is none or the last one failed."""
        # Without the lock while all is well. The flags are read before the producer: a
        # replacement installs the new producer before clearing `_broken`, and `close` clears
        # the producer before setting `_closed`, so a stale producer is never returned here.
        if not (self._broken or self._closed):
            producer = self._producer
            if producer is not None:
                return producer
        with self._lock:
            if self._closed:
                raise BusUnavailable(f"Publisher {self.client_id} is closed")
            if self._producer is not None and not self._broken:
                return self._producer
            if self._producer is not None:
                _discard_producer(self._producer, self.delivery_timeout_ms / 1000 + 1)
                self._producer = None
            self._producer = self._new_producer()
            self._broken = False
            return self._producer

    def _mark_broken(self, producer: KafkaProducer) -> None:
        """Remember that `producer` failed so the next publish starts from a clean one."""
        with self._lock:
            if self._producer is producer:
                self._broken = True

    def _send(
        self,
        producer: KafkaProducer,
        topic: str,
        key: str,
        message: Message,
        headers: list[tuple[str, bytes]] | None,
    ) -> FutureRecordMetadata:
        key_bytes, value = key.encode("utf-8"), message.SerializeToString()
        if self._appends_directly and not headers:
            future = self._appender.append(producer, topic, key_bytes, value)
            if future is not None:
                return future
        return producer.send(
            topic, key=key_bytes, value=value, headers=list(headers) if headers else None
        )

    def publish(
        self,
        topic: str,
        key: str,
        message: Message,
        timeout: float = 5.0,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> tuple[int, int]:
        """Publish one event and block until the broker acknowledged it (acks=all).

        Returns (partition, offset). Raises BusUnavailable on any failure or if `timeout` passes;
        then the record may or may not have been written (at-least-once: callers that retry must
        tolerate a duplicate, e.g. through an idempotency key).
        """
        deadline = time.monotonic() + timeout
        for attempt in range(2):
            producer = self._current()
            try:
                future = self._send(producer, topic, key, message, headers)
                metadata = future.get(timeout=max(0.0, deadline - time.monotonic()))
                return metadata.partition, metadata.offset
            except _STALE_PRODUCER_ERRORS as exc:
                self._mark_broken(producer)
                if attempt == 0 and time.monotonic() < deadline:
                    log.info("Producer id rejected (%s); retrying with a new producer", exc)
                    continue
                raise BusUnavailable(f"Publish to {topic} failed: {exc!r}") from exc
            except (KafkaError, OSError) as exc:
                self._mark_broken(producer)
                raise BusUnavailable(f"Publish to {topic} failed: {exc!r}") from exc
        raise AssertionError("unreachable")

    def publish_async(
        self,
        topic: str,
        key: str,
        message: Message,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> FutureRecordMetadata:
        """Queue an event and return kafka-python's future, for bulk publishing.

        Nothing is acknowledged until the future resolves: call `.get()` on it or `flush()`, and
        check each future, before treating the events as published.
        """
        producer = self._current()
        try:
            future = self._send(producer, topic, key, message, headers)
        except (KafkaError, OSError) as exc:
            self._mark_broken(producer)
            raise BusUnavailable(f"Publish to {topic} failed: {exc!r}") from exc
        future.add_errback(lambda _exc: self._mark_broken(producer))
        return future

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued record completed (succeeded or failed: check the futures)."""
        with self._lock:
            producer = self._producer
        if producer is None:
            return
        try:
            producer.flush(timeout=timeout)
        except (KafkaError, OSError) as exc:
            self._mark_broken(producer)
            raise BusUnavailable(f"Flush did not complete within {timeout}s: {exc!r}") from exc

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to `timeout`) and release the connection."""
        with self._lock:
            producer, self._producer, self._closed = self._producer, None, True
        if producer is None:
            return
        try:
            producer.close(timeout=timeout)
        except (KafkaError, OSError) as exc:
            log.warning("Publisher %s closed with undelivered records: %s", self.client_id, exc)
            _discard_producer(producer, self.delivery_timeout_ms / 1000 + 1)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class Record:
    """One decoded event and where it came from."""

    topic: str
    partition: int
    offset: int
    key: str | None
    message: Message
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()
    value: bytes = b""  # the bytes as stored, for a dead letter


class _Positions(ConsumerRebalanceListener):
    """Next offset to commit per partition, forgetting partitions a rebalance takes away.

    Revoked positions are dropped rather than committed: the caller has not said their records
    are processed, so the new owner must read them again (at-least-once).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[TopicPartition, int] = {}
        self.on_assigned: Any = None  # called with the assigned TopicPartitions, if set

    def advance(self, tp: TopicPartition, offset: int) -> None:
        with self._lock:
            self._next[tp] = offset + 1

    def move_to(self, tp: TopicPartition, next_offset: int) -> None:
        with self._lock:
            self._next[tp] = next_offset

    def snapshot(self) -> dict[TopicPartition, int]:
        with self._lock:
            return dict(self._next)

    def restore(self, snapshot: dict[TopicPartition, int]) -> None:
        with self._lock:
            self._next = dict(snapshot)

    def forget(self, committed: dict[TopicPartition, int]) -> None:
        """Drop positions that were committed and have not moved on since."""
        with self._lock:
            for tp, offset in committed.items():
                if self._next.get(tp) == offset:
                    del self._next[tp]

    def on_partitions_revoked(self, revoked: Any) -> None:
        with self._lock:
            for tp in revoked:
                self._next.pop(tp, None)

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self.on_assigned is not None:
            self.on_assigned(list(assigned))


def _utc_now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


class EventConsumer:
    """Reads protobuf events from Kafka, at-least-once.

    With a group_id, partitions are shared among the group's members and `commit()` records
    progress. With group_id=None every partition of the topics is read (no group, no commits):
    serving pods use this to follow checkpoint events.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: dict[str, type[Message]],
        group_id: str | None,
        dead_letters: Publisher | None = None,
        client_id: str = "rlhf",
        from_beginning: bool = True,
        max_poll_interval_ms: int = 5000,
        session_timeout_ms: int = 6000,
        fetch_max_wait_ms: int = 500,
    ) -> None:
        """`fetch_max_wait_ms`: how long the broker may hold a fetch that found nothing new.
        A record that arrives meanwhile is not always answered at once (on Tansu a checkpoint
        event took 70 ms to arrive at 500, 28 ms at 50), so followers that must react fast
        ask for less."""
        if not topics:
            raise ValueError("EventConsumer needs at least one topic")
        self.bootstrap = bootstrap
        self.topics = dict(topics)
        self.group_id = group_id
        self.dead_letters = dead_letters
        self.dead_lettered = 0
        self._positions = _Positions()
        self._resume: Callable[[], dict[tuple[str, int], int]] | None = None
        self._positions.on_assigned = self._seek_assigned
        self._consumer = self._new_consumer(
            client_id, from_beginning, max_poll_interval_ms, session_timeout_ms, fetch_max_wait_ms
        )
        try:
            self._attach(from_beginning)
        except BaseException:
            self._consumer.close(autocommit=False, timeout_ms=1000)
            raise

    def _new_consumer(
        self,
        client_id: str,
        from_beginning: bool,
        max_poll_interval_ms: int,
        session_timeout_ms: int,
        fetch_max_wait_ms: int,
    ) -> KafkaConsumer:
        """A KafkaConsumer with settings Tansu handles well.

        Tansu holds a JoinGroup for the whole rebalance timeout, which kafka-python sets to
        max_poll_interval_ms, so that must stay small (seconds) or joining takes minutes.
        Without a group, an out-of-range position (the broker lost its data) restarts from the
        earliest offset so no event is missed; "from the end" is applied by an explicit seek.
        """
        reset = "earliest" if self.group_id is None or from_beginning else "latest"
        try:
            return KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id=client_id,
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset=reset,
                max_poll_interval_ms=max_poll_interval_ms,
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=max(100, min(1000, session_timeout_ms // 3)),
                fetch_max_wait_ms=fetch_max_wait_ms,
                allow_auto_create_topics=False,
                bootstrap_timeout_ms=_CONNECT_TIMEOUT_MS,
                reconnect_backoff_max_ms=1000,
                # Range assignment alone: with equal partition counts it gives one member
                # partition p of every topic, so a generation and its feedback (equal keys, equal
                # partition numbers) meet. Round-robin, kafka-python's fallback, would split them.
                partition_assignment_strategy=(RangePartitionAssignor,),
                **client_options(),
            )
        except (KafkaError, OSError) as exc:
            raise BusUnavailable(f"Cannot connect to Kafka at {self.bootstrap}: {exc}") from exc

    def _attach(self, from_beginning: bool) -> None:
        """Join the group, or assign every partition directly when there is no group."""
        if self.group_id is not None:
            self._consumer.subscribe(topics=list(self.topics), listener=self._positions)
            return
        partitions = _partitions_of(self.bootstrap, list(self.topics))
        self._consumer.assign(partitions)
        if from_beginning:
            self._consumer.seek_to_beginning()
        else:
            self._consumer.seek_to_end()

    def resume_from(self, offsets: Callable[[], dict[tuple[str, int], int]]) -> None:
        """On every partition assignment, start each partition at `offsets()[(topic, p)]` when
        given, instead of the group's committed offset.

        A consumer that keeps state in its own checkpoints (the trainer's join state) restarts
        exactly where that state ends, even if it crashed before committing, and after a
        rebalance continues where its memory ends rather than replaying into it.
        """

        self._resume = offsets

    def _seek_assigned(self, assigned: list[TopicPartition]) -> None:
        """Apply `resume_from` to newly assigned partitions (runs inside the rebalance, before
        anything is fetched from them)."""
        wanted = self._resume() if self._resume is not None else {}
        for tp in assigned:
            if (tp.topic, tp.partition) in wanted:
                self._consumer.seek(tp, wanted[(tp.topic, tp.partition)])

    def positions(self) -> dict[tuple[str, int], int]:
        """Next offset per (topic, partition) after every record poll() has returned."""
        return {(tp.topic, tp.partition): n for tp, n in self._positions.snapshot().items()}

    def pause(self) -> None:
        """Stop fetching (polls return nothing) while staying in the group; see `resume`."""
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._consumer.resume(*self._consumer.paused())

    def lag(self) -> int:
        """Records in the assigned partitions not polled yet (0 until the first fetch)."""
        total = 0
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            position = self._positions.snapshot().get(tp)
            if highwater is not None and position is not None:
                total += max(0, highwater - position)
        return total

    def assignment(self) -> set[tuple[str, int]]:
        """(topic, partition) pairs this consumer currently reads; empty until a group join ends."""
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def poll(self, timeout: float = 1.0, max_records: int = 500) -> list[Record]:
        """Fetch and decode the next records, in offset order within each partition.

        Undecodable records are published to the dead-letter topic (synchronously) and skipped.
        If that publish fails, the whole batch is rewound and BusUnavailable raised, so the bad
        record and those after it will be read again rather than lost.
        """
        batch = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        before = self._positions.snapshot()
        records: list[Record] = []
        try:
            for tp, raw_records in batch.items():
                for raw in raw_records:
                    record = self._decode_or_dead_letter(raw)
                    if record is not None:
                        records.append(record)
                    self._positions.advance(tp, raw.offset)
        except BusUnavailable:
            self._rewind(batch, before)
            raise
        return records

    def _rewind(self, batch: dict[TopicPartition, list[Any]], before: dict) -> None:
        """Seek back to the start of an unfinished batch and forget its positions."""
        assigned = self._consumer.assignment()
        for tp, raw_records in batch.items():
            if raw_records and tp in assigned:
                self._consumer.seek(tp, raw_records[0].offset)
        self._positions.restore(before)

    def _decode_or_dead_letter(self, raw: Any) -> Record | None:
        """Decode one ConsumerRecord, or dead-letter it and return None."""
        try:
            return _decode(raw, self.topics[raw.topic])
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            self._dead_letter(
                raw.topic,
                raw.partition,
                raw.offset,
                raw.key or b"",
                raw.value or b"",
                f"{type(exc).__name__}: {exc}",
            )
            return None

    def dispatch(self, records: list[Record], handle: Callable[[Record], Any]) -> int:
        """Hand each record to `handle`, in order; returns how many were handled.

        A record whose handling raises is dead-lettered with the reason and the records after it
        are handled as usual: one poison record does not stop its partition, nor the rest of the
        batch. If the dead-letter publish itself fails, every partition is rewound to its first
        record not handled yet and BusUnavailable raised, so that record and those after it are
        read again rather than lost.
        """
        handled = 0
        for index, record in enumerate(records):
            try:
                handle(record)
                handled += 1
            except Exception as exc:
                log.exception(
                    "handling %s/%d@%d failed", record.topic, record.partition, record.offset
                )
                try:
                    self._dead_letter(
                        record.topic,
                        record.partition,
                        record.offset,
                        (record.key or "").encode("utf-8", "surrogatepass"),
                        record.value,
                        f"handler failed: {type(exc).__name__}: {exc}"[:4096],
                    )
                except BusUnavailable:
                    self._rewind_to(records[index:])
                    raise
        return handled

    def _rewind_to(self, unhandled: list[Record]) -> None:
        """Seek each partition back to its first record in `unhandled`."""
        assigned = self._consumer.assignment()
        first: dict[TopicPartition, int] = {}
        for record in unhandled:
            first.setdefault(TopicPartition(record.topic, record.partition), record.offset)
        for tp, offset in first.items():
            if tp in assigned:
                self._consumer.seek(tp, offset)
            self._positions.move_to(tp, offset)

    def _dead_letter(
        self, topic: str, partition: int, offset: int, key: bytes, value: bytes, reason: str
    ) -> None:
        """Park a record that cannot be processed on DEAD_LETTER, acknowledged, before it is
        skipped."""
        where = f"{topic}/{partition}@{offset}"
        if self.dead_letters is None:
            log.error("Skipping %s (no dead-letter publisher): %s", where, reason)
            return
        letter = events_pb2.DeadLetter(
            source_topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            reason=reason,
            consumer_group=self.group_id or "",
            failed_at=_utc_now(),
        )
        self.dead_letters.publish(DEAD_LETTER, where, letter)
        self.dead_lettered += 1
        log.warning("Dead-lettered record %s: %s", where, reason)

    def commit(
        self, timeout: float = 10.0, offsets: dict[tuple[str, int], int] | None = None
    ) -> None:
        """Commit the position after every record poll() has returned so far, or `offsets`
        (next offset per (topic, partition)) when given, e.g. those a checkpoint covers.

        Call it only once their processing is durable. Raises BusUnavailable if the broker did
        not confirm (positions are kept and go out with the next commit). If a rebalance took
        the partitions away meanwhile, the commit is dropped and the records will be redelivered.
        """
        if self.group_id is None:
            return
        if offsets is None:
            positions = self._positions.snapshot()
        else:
            positions = {TopicPartition(t, p): n for (t, p), n in offsets.items()}
        if not positions:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in positions.items()}
        try:
            self._consumer.commit(offsets=offsets, timeout_ms=int(timeout * 1000))
        except CommitFailedError as exc:
            log.warning("Commit rejected after a rebalance; records will be redelivered: %s", exc)
            self._positions.forget(positions)
            return
        except (KafkaError, OSError) as exc:
            raise BusUnavailable(f"Commit for group {self.group_id} failed: {exc!r}") from exc
        self._positions.forget(positions)

    def close(self) -> None:
        """Leave the group without committing anything not explicitly committed."""
        with contextlib.suppress(Exception):
            self._consumer.close(autocommit=False, timeout_ms=2000)

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _decode(raw: Any, message_type: type[Message]) -> Record:
    """Turn a ConsumerRecord into a Record; raises on bytes that are not a `message_type`."""
    if raw.value is None:
        raise ValueError("record has no value (tombstone)")
    key = raw.key.decode("utf-8") if raw.key is not None else None
    headers = tuple((name, bytes(value or b"")) for name, value in (raw.headers or ()))
    return Record(
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        key=key,
        message=message_type.FromString(raw.value),
        timestamp_ms=raw.timestamp,
        headers=headers,
        value=bytes(raw.value),
    )


def _partitions_of(bootstrap: str, topics: list[str]) -> list[TopicPartition]:
    """Every partition of `topics`, asked of the broker with bounded waits."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="rlhf-partitions",
            bootstrap_timeout_ms=_CONNECT_TIMEOUT_MS,
            request_timeout_ms=_CONNECT_TIMEOUT_MS,
            **client_options(),
        )
    except (KafkaError, OSError) as exc:
        raise BusUnavailable(f"Cannot connect to Kafka at {bootstrap}: {exc}") from exc
    try:
        described = admin.describe_topics(topics)
    except (KafkaError, OSError) as exc:
        raise BusUnavailable(f"Cannot describe topics {topics}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            admin.close()
    return _collect_partitions(described, topics)


def _collect_partitions(described: list[dict], topics: list[str]) -> list[TopicPartition]:
    found: dict[str, list[TopicPartition]] = {}
    for topic in described:
        if topic.get("error_code", 0) == 0 and topic.get("partitions"):
            found[topic["name"]] = [
                TopicPartition(topic["name"], p["partition_index"]) for p in topic["partitions"]
            ]
    missing = [t for t in topics if t not in found]
    if missing:
        raise BusUnavailable(f"Topics {missing} do not exist; run ensure_topics() first")
    return [tp for t in topics for tp in found[t]]
