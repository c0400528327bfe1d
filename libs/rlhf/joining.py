"""Join feedback events to the generation events they rate, whichever arrives first.

Both topics are keyed by `rlhf.ids.partition_key` (the prompt digest in the generation id), so a
generation, the feedback on it and any ranking over its prompt share a partition number; they can
still arrive in either order (two topics, two fetches).

Two joins. `FeedbackJoin` is for a consumer that reads every partition and checkpoints its whole
state (the trainer): it holds feedback that came before its generation and keeps joining what
follows. `GroupJoin` is for consumers that share the partitions in a group: across a rebalance only
the committed offset passes to the next owner, so it joins each feedback partition strictly in
offset order (`PartitionJoin`) and commits exactly what it joined.

Feedback is deduplicated here: the feedback service derives each event id from (tenant,
idempotency key), so a resent submission published twice (a retry after a lost reply, a service
restart) carries the same event id, and only its first copy is joined. Every copy has the same
key, so one consumer sees them all.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from rlhf import bus
from rlhf.v1 import events_pb2


@dataclass(frozen=True)
class Joined:
    generation: events_pb2.GenerationEvent
    feedback: events_pb2.FeedbackEvent


@dataclass(frozen=True)
class JoinState:
    """Everything a FeedbackJoin holds, for a checkpoint: generations waiting for feedback,
    feedback waiting for its generation (arrival order) and the feedback ids already seen."""

    generations: list[events_pb2.GenerationEvent]
    orphans: list[events_pb2.FeedbackEvent]
    seen_feedback_ids: list[str]


class RecentIds:
    """A bounded set remembering the last `capacity` ids added."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __iter__(self) -> Iterator[str]:
        """Oldest first, so adding them in this order rebuilds the same set."""
        return iter(list(self._ids))

    def __contains__(self, id_: object) -> bool:
        return id_ in self._ids

    def add(self, id_: str) -> bool:
        """Remember `id_`; False if it was already remembered."""
        if id_ in self._ids:
            self._ids.move_to_end(id_)
            return False
        self._ids[id_] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


class FeedbackJoin:
    def __init__(self, max_pending: int = 50_000, remembered_feedback: int = 500_000) -> None:
        self.max_pending = max_pending
        self._generations: OrderedDict[str, events_pb2.GenerationEvent] = OrderedDict()
        self._orphans: OrderedDict[str, list[events_pb2.FeedbackEvent]] = OrderedDict()
        self._feedback_ids = RecentIds(remembered_feedback)
        self.evicted = 0
        self.duplicates = 0

    def add_generation(self, event: events_pb2.GenerationEvent) -> list[Joined]:
        """Remember a generation; returns the feedback that was waiting for it."""
        self._generations[event.generation_id] = event
        self._generations.move_to_end(event.generation_id)
        self._bound(self._generations)
        waiting = self._orphans.pop(event.generation_id, [])
        return [Joined(event, feedback) for feedback in waiting]

    def add_feedback(self, event: events_pb2.FeedbackEvent) -> list[Joined]:
        """Join feedback to its generation, or hold it until the generation arrives.

        A second copy of an event id already seen is dropped (counted in `duplicates`).
        """
        if event.event_id and not self._feedback_ids.add(event.event_id):
            self.duplicates += 1
            return []
        generation_id = event.feedback.generation_id
        generation = self._generations.get(generation_id)
        if generation is not None:
            return [Joined(generation, event)]
        self._orphans.setdefault(generation_id, []).append(event)
        self._bound(self._orphans)
        return []

    def _bound(self, entries: OrderedDict) -> None:
        while len(entries) > self.max_pending:
            entries.popitem(last=False)
            self.evicted += 1

    def snapshot(self) -> JoinState:
        return JoinState(
            generations=list(self._generations.values()),
            orphans=[event for waiting in self._orphans.values() for event in waiting],
            seen_feedback_ids=list(self._feedback_ids),
        )

    def restore(self, state: JoinState) -> None:
        """Replace the contents with a snapshot's (counters are not part of it)."""
        self._generations.clear()
        self._orphans.clear()
        self._feedback_ids = RecentIds(self._feedback_ids.capacity)
        for id_ in state.seen_feedback_ids:
            self._feedback_ids.add(id_)
        for generation in state.generations:
            self._generations[generation.generation_id] = generation
        for event in state.orphans:
            self._orphans.setdefault(event.feedback.generation_id, []).append(event)

    @property
    def pending(self) -> int:
        return len(self._generations) + len(self._orphans)


@dataclass
class Ledger:
    """Counts feedback events and sums a 64-bit hash of their ids, so "every event used exactly
    once" can be checked from two numbers: a lost event lowers both, a repeat raises both."""

    count: int = 0
    digest: int = 0

    def add(self, event_id: str) -> None:
        self.count += 1
        self.digest = (self.digest + id_hash(event_id)) % 2**64

    @classmethod
    def of(cls, event_ids: Iterable[str]) -> Ledger:
        ledger = cls()
        for event_id in event_ids:
            ledger.add(event_id)
        return ledger


def id_hash(event_id: str) -> int:
    return int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class _Waiting:
    offset: int
    event: events_pb2.FeedbackEvent
    read_at: float  # clock reading when it was read


class PartitionJoin:
    """The join of one partition number (of both topics), in feedback offset order.

    Feedback waits while a generation it refers to is unknown (for a ranking: every generation it
    orders, so it is joined whole), and everything behind it waits too. So there is one offset,
    `commit_offset`, before which every feedback event is joined (or given up) and from which none
    is: a next owner that re-reads the generations partition from its start and the feedback
    partition from that offset joins each event exactly once. Waits are short: a generation is
    published before anyone has its id to give feedback on, so it is in the log first; only the
    order of two fetches can put feedback ahead (`give_up_waiting` covers ids that never come).
    """

    def __init__(self, max_generations: int = 50_000, remembered_feedback: int = 100_000) -> None:
        self.max_generations = max_generations
        self._generations: OrderedDict[str, events_pb2.GenerationEvent] = OrderedDict()
        self._waiting: deque[_Waiting] = deque()
        self._feedback_ids = RecentIds(remembered_feedback)
        self._next_offset: int | None = None
        self.evicted = 0
        self.duplicates = 0
        self.given_up = 0

    def add_generation(self, event: events_pb2.GenerationEvent) -> list[Joined]:
        """Remember a generation; returns the feedback that was waiting for it (and behind it)."""
        self._generations[event.generation_id] = event
        self._generations.move_to_end(event.generation_id)
        while len(self._generations) > self.max_generations:
            self._generations.popitem(last=False)
            self.evicted += 1
        return self._drain()

    def add_feedback(
        self, offset: int, event: events_pb2.FeedbackEvent, read_at: float = 0.0
    ) -> list[Joined]:
        """Queue feedback read at `offset` and join every queued event that can be, in order."""
        self._waiting.append(_Waiting(offset, event, read_at))
        self._next_offset = offset + 1
        return self._drain()

    def generation(self, generation_id: str) -> events_pb2.GenerationEvent | None:
        return self._generations.get(generation_id)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def oldest_wait(self) -> float | None:
        """When the feedback at the head of the queue was read; None if nothing waits."""
        return self._waiting[0].read_at if self._waiting else None

    def commit_offset(self) -> int | None:
        """The feedback offset to commit: every event before it is done, none from it on."""
        return self._waiting[0].offset if self._waiting else self._next_offset

    def give_up_waiting(self, read_before: float) -> list[Joined]:
        """Drop feedback read before `read_before` that still misses a generation (counted in
        `given_up`), and join what it held up.

        Call it only once the generations partition has been read up to an end offset asked of
        the broker after `read_before`: whatever the dropped feedback refers to was published
        before it, so a generation not read by then never comes (evicted, or never published).
        """
        joined: list[Joined] = []
        while self._waiting and self._waiting[0].read_at < read_before:
            self._waiting.popleft()
            self.given_up += 1
            joined += self._drain()
        return joined

    def _drain(self) -> list[Joined]:
        joined: list[Joined] = []
        while self._waiting:
            event = self._waiting[0].event
            if event.event_id and event.event_id in self._feedback_ids:
                self.duplicates += 1
            else:
                feedback = event.feedback
                wanted = [feedback.generation_id, *feedback.ranking.generation_ids]
                if not all(id_ in self._generations for id_ in wanted):
                    return joined
                if event.event_id:
                    self._feedback_ids.add(event.event_id)
                joined.append(Joined(self._generations[feedback.generation_id], event))
            self._waiting.popleft()
        return joined


class GroupJoin:
    """One member of a consumer group joining generations and feedback: a `PartitionJoin` per
    partition it owns, and commits that move exactly past what it joined.

    Use: `joined = group_join.poll()`, make what was joined durable, then `group_join.commit()`.
    A rebalance (or close) drops the state of the partitions taken away; the next owner (maybe
    this member again) re-reads their generations from the start of the topic, a table to
    rebuild, and their feedback from the committed offset. The consumer must be in a group and
    read exactly the two topics; both must have one partition count (`bus.check_copartitioned`).

    Not yet done: the generations are re-read from the start of the retained log on every
    assignment, and feedback ids remembered for deduplication are those seen since then.
    """

    def __init__(
        self,
        consumer: bus.EventConsumer,
        generations_topic: str = bus.GENERATIONS,
        feedback_topic: str = bus.FEEDBACK,
        give_up_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        make_join: Callable[[], PartitionJoin] = PartitionJoin,
    ) -> None:
        if consumer.group_id is None or set(consumer.topics) != {generations_topic, feedback_topic}:
            raise ValueError(
                "GroupJoin needs a group consumer of the generations and feedback topics"
            )
        self.consumer = consumer
        self.generations_topic = generations_topic
        self.feedback_topic = feedback_topic
        self.give_up_after = give_up_after
        self._clock = clock
        self._make_join = make_join
        # The rebalance callback runs on kafka-python's network thread.
        self._lock = threading.Lock()
        self._joins: dict[int, PartitionJoin] = {}
        consumer.read_from_start([generations_topic])
        consumer.on_revoked(self._revoked)

    def _revoked(self, pairs: list[tuple[str, int]]) -> None:
        with self._lock:
            for _topic, partition in pairs:
                self._joins.pop(partition, None)

    def _join(self, partition: int) -> PartitionJoin:
        join = self._joins.get(partition)
        if join is None:
            join = self._joins[partition] = self._make_join()
        return join

    def joins(self) -> dict[int, PartitionJoin]:
        """The join of every partition this member holds state for, by partition number."""
        with self._lock:
            return dict(self._joins)

    def poll(self, timeout: float = 1.0) -> list[Joined]:
        """Read the next records and return the feedback they let join, in offset order per
        partition. Raises BusUnavailable like `EventConsumer.poll`."""
        records = self.consumer.poll(timeout=timeout)
        now = self._clock()
        joined: list[Joined] = []
        with self._lock:
            for record in records:
                join = self._join(record.partition)
                if record.topic == self.generations_topic:
                    joined += join.add_generation(record.message)
                else:
                    joined += join.add_feedback(record.offset, record.message, now)
        return joined + self._give_up_stuck()

    def _give_up_stuck(self) -> list[Joined]:
        """Release feedback that waited past `give_up_after` for a generation that, the broker's
        end offsets show, is not in the generations partition (see `give_up_waiting`)."""
        cutoff = self._clock() - self.give_up_after
        stuck = [
            partition
            for partition, join in self.joins().items()
            if (oldest := join.oldest_wait()) is not None and oldest < cutoff
        ]
        if not stuck:
            return []
        pairs = [(self.generations_topic, partition) for partition in stuck]
        ends = self.consumer.end_offsets(pairs)
        read = self.consumer.positions()
        joined: list[Joined] = []
        with self._lock:
            for (topic, partition), end in ends.items():
                join = self._joins.get(partition)
                if join is not None and read.get((topic, partition), 0) >= end:
                    joined += join.give_up_waiting(cutoff)
        return joined

    def commit_offsets(self) -> dict[tuple[str, int], int]:
        """Feedback offsets up to which everything returned by `poll` is done."""
        with self._lock:
            offsets = {(self.feedback_topic, p): j.commit_offset() for p, j in self._joins.items()}
        return {pair: offset for pair, offset in offsets.items() if offset is not None}

    def commit(self, timeout: float = 10.0) -> None:
        """Commit `commit_offsets()`: call it once what `poll` returned is durable."""
        offsets = self.commit_offsets()
        if offsets:
            self.consumer.commit(timeout=timeout, offsets=offsets)
