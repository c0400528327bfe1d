"""Join feedback events to the generation events they rate, whichever arrives first.

Both topics are keyed by generation id, so one consumer sees a generation and its feedback on the
same partition; they can still arrive in either order (two topics, two fetches). Memory is bounded:
past `max_pending` entries, the oldest generations and orphan feedback are dropped and counted.

Feedback is deduplicated here: the feedback service derives each event id from (tenant,
idempotency key), so a resent submission published twice (a retry after a lost reply, a service
restart) carries the same event id, and only its first copy is joined. The same key lands in the
same partition (keyed by generation id), so one consumer sees every copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from rlhf.v1 import events_pb2


@dataclass(frozen=True)
class Joined:
    generation: events_pb2.GenerationEvent
    feedback: events_pb2.FeedbackEvent


class RecentIds:
    """A bounded set remembering the last `capacity` ids added."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

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

    @property
    def pending(self) -> int:
        return len(self._generations) + len(self._orphans)
