"""The ppo stage's intake: generations and feedback in, joined prompts queued for rollouts."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import EventConsumer
from rlhf.joining import FeedbackJoin, Joined, Ledger
from rlhf.v1 import events_pb2

from ..stage import ConsumerThread
from .state import IntakeSnapshot

FEEDBACK_CONSUMED = Counter("rlhf_trainer_feedback_consumed_total", "feedback events consumed")
FEEDBACK_USED = Counter(
    "rlhf_trainer_feedback_used_total", "feedback events whose prompts a PPO update trained on"
)
PENDING = Gauge("rlhf_trainer_pending_prompts", "joined prompts waiting for a rollout")
STALE = Counter(
    "rlhf_trainer_stale_prompts_total", "joined prompts dropped as older than the staleness bound"
)
LAG = Gauge("rlhf_trainer_consumer_lag", "events in the input topics not consumed yet")

# A joined queue this long pauses fetching until training has taken half of it.
MAX_QUEUED = 10_000


def _age_seconds(generation: events_pb2.GenerationEvent, now: float) -> float:
    """How old a generation is; 0 when it carries no timestamp (nothing to bound)."""
    if not generation.HasField("created_at"):
        return 0.0
    return max(0.0, now - generation.created_at.ToNanoseconds() / 1e9)


class Intake(ConsumerThread):
    """Consumes and joins generation and feedback events (runs in its own thread)."""

    def __init__(
        self,
        consumer: EventConsumer,
        max_prompt_tokens: int,
        max_staleness_seconds: float = math.inf,
        max_queued: int = MAX_QUEUED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(consumer, "trainer-intake")
        self._join = FeedbackJoin()
        self._max_prompt_tokens = max_prompt_tokens
        self._max_staleness = max_staleness_seconds
        self._max_queued = max_queued
        self._clock = clock
        self._queue: deque[Joined] = deque()
        self.used = Ledger()
        self.skipped_prompts = 0
        self.stale_prompts = 0

    def __len__(self) -> int:
        with self.lock:
            return len(self._queue)

    def take(self, count: int) -> tuple[list[Joined], float]:
        """Up to `count` joined prompts, oldest first, and the age of the oldest one; prompts
        older than the staleness bound are dropped (counted) instead."""
        now = self._clock()
        batch: list[Joined] = []
        oldest = 0.0
        with self.lock:
            while self._queue and len(batch) < count:
                joined = self._queue.popleft()
                age = _age_seconds(joined.generation, now)
                if age > self._max_staleness:
                    self.stale_prompts += 1
                    STALE.inc()
                    continue
                batch.append(joined)
                oldest = max(oldest, age)
        return batch, oldest

    def put_back(self, batch: list[Joined]) -> None:
        with self.lock:
            self._queue.extendleft(reversed(batch))

    def mark_used(self, batch: list[Joined]) -> None:
        with self.lock:
            for joined in batch:
                self.used.add(joined.feedback.event_id)
        FEEDBACK_USED.inc(len(batch))

    def handle(self, record: bus.Record) -> None:
        if record.topic == bus.GENERATIONS:
            joined = self._join.add_generation(record.message)
        else:
            self.feedback_consumed += 1
            FEEDBACK_CONSUMED.inc()
            joined = self._join.add_feedback(record.message)
        # A generation without prompt tokens (another producer, a synthetic event) or with a
        # prompt too long for PPO cannot be rolled out: skip it, counted, rather than fail a batch.
        usable = [
            j for j in joined if 0 < len(j.generation.prompt_token_ids) <= self._max_prompt_tokens
        ]
        self.skipped_prompts += len(joined) - len(usable)
        self._queue.extend(usable)

    def wants_fetch_paused(self, paused: bool) -> bool:
        queued = len(self)
        return queued >= self._max_queued or (paused and queued > self._max_queued // 2)

    def after_poll(self) -> None:
        PENDING.set(len(self))
        LAG.set(self.lag)

    def snapshot(self) -> IntakeSnapshot:
        with self.lock:
            return IntakeSnapshot(
                offsets=dict(self.offsets),
                join=self._join.snapshot(),
                queue=list(self._queue),
                used=Ledger(self.used.count, self.used.digest),
                counters={
                    "feedback_consumed": self.feedback_consumed,
                    "skipped_prompts": self.skipped_prompts,
                    "stale_prompts": self.stale_prompts,
                },
            )

    def restore(self, snapshot: IntakeSnapshot) -> None:
        """Start from a checkpoint's intake (call before `start`)."""
        with self.lock:
            self.offsets = dict(snapshot.offsets)
            self._join.restore(snapshot.join)
            self._queue = deque(snapshot.queue)
            self.used = Ledger(snapshot.used.count, snapshot.used.digest)
            self.feedback_consumed = snapshot.counters.get("feedback_consumed", 0)
            self.skipped_prompts = snapshot.counters.get("skipped_prompts", 0)
            self.stale_prompts = snapshot.counters.get("stale_prompts", 0)
