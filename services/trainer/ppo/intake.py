"""The ppo stage's intake: generations and feedback in, joined prompts queued for rollouts."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import EventConsumer
from rlhf.joining import Joined, Ledger
from rlhf.training.state import IntakeState
from rlhf.v1 import events_pb2

from ..stage import ConsumerThread

FEEDBACK_CONSUMED = Counter("rlhf_trainer_feedback_consumed_total", "feedback events consumed")
FEEDBACK_USED = Counter(
    "rlhf_trainer_feedback_used_total", "feedback events whose prompts a PPO update trained on"
)
PENDING = Gauge("rlhf_trainer_pending_prompts", "joined prompts waiting for a rollout")
STALE = Counter(
    "rlhf_trainer_stale_prompts_total", "joined prompts dropped as older than the staleness bound"
)
OVERFLOW = Counter(
    "rlhf_trainer_overflow_prompts_total",
    "joined prompts dropped, oldest first, to keep the queue within its bound (newest first)",
)
LAG = Gauge("rlhf_trainer_consumer_lag", "events in the input topics not consumed yet")

# The joined queue's bound. Oldest first, a queue this long pauses fetching until training has
# taken half of it; newest first, its oldest prompts are dropped instead.
MAX_QUEUED = 10_000


def _age_seconds(generation: events_pb2.GenerationEvent, now: float) -> float:
    """How old a generation is; 0 when it carries no timestamp (nothing to bound)."""
    if not generation.HasField("created_at"):
        return 0.0
    return max(0.0, now - generation.created_at.ToNanoseconds() / 1e9)


QUEUED_GENERATIONS, QUEUED_FEEDBACK = "queue.generations", "queue.feedback"


class Intake(ConsumerThread):
    """Consumes and joins generation and feedback events (runs in its own thread); its state
    adds the joined prompts not trained on yet and the ledger of feedback used."""

    messages = {
        QUEUED_GENERATIONS: events_pb2.GenerationEvent,
        QUEUED_FEEDBACK: events_pb2.FeedbackEvent,
    }

    def __init__(
        self,
        consumer: EventConsumer,
        max_prompt_tokens: int,
        max_staleness_seconds: float = math.inf,
        max_queued: int = MAX_QUEUED,
        clock: Callable[[], float] = time.time,
        newest_first: bool = False,
    ) -> None:
        super().__init__(consumer, "trainer-intake")
        self._max_prompt_tokens = max_prompt_tokens
        self._max_staleness = max_staleness_seconds
        self._newest_first = newest_first
        self._max_queued = max_queued
        self._clock = clock
        self._queue: deque[Joined] = deque()
        self.used = Ledger()
        self.skipped_prompts = 0
        self.stale_prompts = 0
        self.overflow_prompts = 0

    def __len__(self) -> int:
        with self.lock:
            return len(self._queue)

    @property
    def dropped_prompts(self) -> int:
        """Joined prompts dropped untrained: past the staleness bound, or the oldest of a full
        queue (newest first)."""
        return self.stale_prompts + self.overflow_prompts

    def take(self, count: int) -> tuple[list[Joined], float]:
        """Up to `count` joined prompts, the newest or the oldest first, and the age of the
        oldest one taken; prompts older than the staleness bound are dropped (counted)
        instead. Newest first, the queue's stale head is dropped at every take too, so what
        the trainer does not get to is gone after the bound rather than held until its turn."""
        now = self._clock()
        batch: list[Joined] = []
        oldest = 0.0
        with self.lock:
            if self._newest_first:
                while self._queue and self._stale(self._queue[0], now):
                    self._queue.popleft()
            pop = self._queue.pop if self._newest_first else self._queue.popleft
            while self._queue and len(batch) < count:
                joined = pop()
                if self._stale(joined, now):
                    continue
                batch.append(joined)
                oldest = max(oldest, _age_seconds(joined.generation, now))
        return batch, oldest

    def _stale(self, joined: Joined, now: float) -> bool:
        """Whether `joined` is past the staleness bound (then counted as dropped)."""
        if _age_seconds(joined.generation, now) <= self._max_staleness:
            return False
        self.stale_prompts += 1
        STALE.inc()
        return True

    def put_back(self, batch: list[Joined]) -> None:
        """Return a batch `take` gave (untrained): the next take gives it again."""
        with self.lock:
            if self._newest_first:
                self._queue.extend(reversed(batch))
            else:
                self._queue.extendleft(reversed(batch))

    def mark_used(self, batch: list[Joined]) -> None:
        with self.lock:
            for joined in batch:
                self.used.add(joined.feedback.event_id)
        FEEDBACK_USED.inc(len(batch))

    def handle(self, record: bus.Record) -> None:
        if record.topic == bus.GENERATIONS:
            joined = self.join.add_generation(record.message)
        else:
            self.feedback_consumed += 1
            FEEDBACK_CONSUMED.inc()
            joined = self.join.add_feedback(record.message)
        # A generation without prompt tokens (another producer, a synthetic event) or with a
        # prompt too long for PPO cannot be rolled out: skip it, counted, rather than fail a batch.
        usable = [
            j for j in joined if 0 < len(j.generation.prompt_token_ids) <= self._max_prompt_tokens
        ]
        self.skipped_prompts += len(joined) - len(usable)
        self._queue.extend(usable)
        if self._newest_first:  # the oldest would be taken last, if ever: drop them
            while len(self._queue) > self._max_queued:
                self._queue.popleft()
                self.overflow_prompts += 1
                OVERFLOW.inc()

    def wants_fetch_paused(self, paused: bool) -> bool:
        """Oldest first, a full queue holds fetching back (the backlog stays in the broker and
        is taken in turn); newest first, fetching goes on, as what waits in the broker would
        be older than anything queued."""
        if self._newest_first:
            return False
        queued = len(self)
        return queued >= self._max_queued or (paused and queued > self._max_queued // 2)

    def after_poll(self) -> None:
        PENDING.set(len(self))
        LAG.set(self.lag)

    def save_held(self, state: IntakeState) -> None:
        state.messages[QUEUED_GENERATIONS] = [j.generation for j in self._queue]
        state.messages[QUEUED_FEEDBACK] = [j.feedback for j in self._queue]
        state.data["used"] = {"count": self.used.count, "digest": f"{self.used.digest:016x}"}
        state.counters.update(
            skipped_prompts=self.skipped_prompts,
            stale_prompts=self.stale_prompts,
            overflow_prompts=self.overflow_prompts,
        )

    def restore_held(self, state: IntakeState) -> None:
        generations, feedback = state.messages[QUEUED_GENERATIONS], state.messages[QUEUED_FEEDBACK]
        self._queue = deque(Joined(g, f) for g, f in zip(generations, feedback, strict=True))
        used = state.data["used"]
        self.used = Ledger(int(used["count"]), int(used["digest"], 16))
        self.skipped_prompts = state.counters.get("skipped_prompts", 0)
        self.stale_prompts = state.counters.get("stale_prompts", 0)
        self.overflow_prompts = state.counters.get("overflow_prompts", 0)
