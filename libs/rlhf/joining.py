"""Join feedback events to the generation events they rate, whichever arrives first.

Both topics are keyed by `rlhf.ids.partition_key` (the prompt digest in the generation id), so a
generation, the feedback on it and any ranking over its prompt share a partition number; they can
still arrive in either order (two topics, two fetches).

`FeedbackJoin` is for a consumer that reads every partition and checkpoints its whole state (each
trainer stage): it holds feedback that came before its generation and keeps joining what follows.

Feedback is deduplicated here: the feedback service derives each event id from (tenant,
idempotency key), so a resent submission published twice (a retry after a lost reply, a service
restart) carries the same event id, and only its first copy is joined. Every copy has the same
key, so one consumer sees them all.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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

    def generation(self, generation_id: str) -> events_pb2.GenerationEvent | None:
        """A generation the join still holds (the newest `max_pending` are), or None."""
        return self._generations.get(generation_id)

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
