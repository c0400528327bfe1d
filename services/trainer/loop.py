"""The online PPO loop: joined feedback in, PPO updates, policy checkpoints out.

Two threads. The intake thread owns the Kafka consumer: it polls generations and feedback, joins
them and queues the prompts that received feedback; it also commits offsets when asked, because a
KafkaConsumer must only be used from one thread. The training thread takes a batch of prompts,
runs a PPO iteration (rollouts from the trainer's policy, scored by the reward service), and every
`publish_every` updates writes a policy checkpoint, announces it, then asks for a commit: offsets
move only once the checkpoint that used their events is durable.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field, replace

from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import BusUnavailable, EventConsumer, Publisher
from rlhf.checkpoints import POLICY, CheckpointStore, Manifest
from rlhf.clients import RewardUnavailable
from rlhf.joining import FeedbackJoin, Joined
from rlhf.models import policy_checkpoint_files
from rlhf.scoring import reward_prompt
from rlhf.training.online import PPOLearner, Scorer
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

STATS = Gauge("rlhf_trainer_stat", "last PPO statistics, named like TRL's", ["name"])
UPDATES = Counter("rlhf_trainer_updates_total", "PPO updates done")
FEEDBACK_CONSUMED = Counter("rlhf_trainer_feedback_consumed_total", "feedback events consumed")
PUBLISHED_VERSION = Gauge("rlhf_trainer_published_version", "last policy version published")
FAILED_BATCHES = Counter("rlhf_trainer_failed_batches_total", "PPO iterations that raised")
PENDING = Gauge("rlhf_trainer_pending_prompts", "joined prompts waiting for a rollout")

MAX_QUEUED = 10_000


@dataclass(frozen=True)
class Status:
    stage: str = "ppo"
    step: int = 0
    policy_version: int = 0
    kl: float = 0.0
    mean_reward: float = 0.0
    pending_prompts: int = 0
    feedback_consumed: int = 0
    reward_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def checkpoint_event(
    kind: events_pb2.CheckpointKind, manifest: Manifest, metrics: dict[str, float]
) -> events_pb2.CheckpointEvent:
    """The event announcing a checkpoint written to the store."""
    created = Timestamp()
    created.FromNanoseconds(int(manifest.created_at * 1e9))
    return events_pb2.CheckpointEvent(
        kind=kind,
        version=manifest.version,
        parent_version=manifest.parent_version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
        created_at=created,
        metrics=metrics,
    )


class ConsumerThread:
    """Owns a Kafka consumer in its own thread and commits its offsets when asked.

    A KafkaConsumer must only be used from one thread, so the training thread cannot commit
    itself: it calls `commit()`, which hands the request over and waits for it. Subclasses say
    what to do with each record (`handle`).
    """

    def __init__(self, consumer: EventConsumer, name: str) -> None:
        self._consumer = consumer
        self._commit_wanted = threading.Event()
        self._committed = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self._consumer.close()

    def commit(self, timeout: float = 30.0) -> bool:
        """Ask the consumer thread to commit what it consumed; True once it has."""
        self._committed.clear()
        self._commit_wanted.set()
        return self._committed.wait(timeout)

    def handle(self, record: bus.Record) -> None:
        raise NotImplementedError

    def after_poll(self) -> None:
        """Called after each poll, e.g. to update gauges."""

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                for record in self._consumer.poll(timeout=0.5):
                    self.handle(record)
                self.after_poll()
                if self._commit_wanted.is_set():
                    self._commit_wanted.clear()
                    self._consumer.commit()
                    self._committed.set()
            except Exception:  # keep consuming through broker restarts and rebalances
                log.exception("%s failed; retrying", self._thread.name)
                self._stopping.wait(1.0)


class Intake(ConsumerThread):
    """Consumes and joins generation and feedback events (runs in its own thread)."""

    def __init__(self, consumer: EventConsumer, max_prompt_tokens: int) -> None:
        super().__init__(consumer, "trainer-intake")
        self._join = FeedbackJoin()
        self._max_prompt_tokens = max_prompt_tokens
        self._queue: deque[Joined] = deque(maxlen=MAX_QUEUED)
        self._lock = threading.Lock()
        self.feedback_consumed = 0
        self.skipped_prompts = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def take(self, count: int) -> list[Joined]:
        with self._lock:
            return [self._queue.popleft() for _ in range(min(count, len(self._queue)))]

    def put_back(self, batch: list[Joined]) -> None:
        with self._lock:
            self._queue.extendleft(reversed(batch))

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
        with self._lock:
            self._queue.extend(usable)

    def after_poll(self) -> None:
        PENDING.set(len(self))


class TrainingLoop:
    """Runs PPO iterations as joined prompts arrive and publishes policy checkpoints."""

    def __init__(
        self,
        learner: PPOLearner,
        intake: Intake,
        score: Scorer,
        store: CheckpointStore,
        publisher: Publisher,
        batch_size: int,
        publish_every: int,
        start_version: int,
        keep_checkpoints: int = 5,
    ) -> None:
        self.learner = learner
        self.intake = intake
        self._score = score
        self._store = store
        self._publisher = publisher
        self._batch_size = batch_size
        self._publish_every = publish_every
        self._keep_checkpoints = keep_checkpoints
        self._status = Status(policy_version=start_version)
        self._unannounced: Manifest | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-ppo", daemon=True)

    @property
    def status(self) -> Status:
        return replace(
            self._status,
            pending_prompts=len(self.intake),
            feedback_consumed=self.intake.feedback_consumed,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._unannounced is not None:
                self._announce(self._unannounced)
            if len(self.intake) < self._batch_size:
                self._stopping.wait(0.2)
                continue
            batch = self.intake.take(self._batch_size)
            try:
                self.step(batch)
            except Exception:  # one bad batch must not stop training for good
                FAILED_BATCHES.inc()
                log.exception("PPO iteration failed; dropping its %d prompts", len(batch))

    def step(self, batch: list[Joined]) -> dict[str, float] | None:
        """One PPO iteration on a batch of joined prompts; publishes when it is time."""
        prompts = [list(j.generation.prompt_token_ids) for j in batch]
        # The reward model is asked about the user's words, as it was trained (not the template).
        texts = [reward_prompt(j.generation) for j in batch]
        try:
            stats = self.learner.iterate(prompts, self._score, prompt_texts=texts)
        except RewardUnavailable as exc:
            log.warning("reward service unavailable (%s); retrying the batch shortly", exc)
            self.intake.put_back(batch)
            self._stopping.wait(2.0)
            return None
        UPDATES.inc()
        for name, value in stats.items():
            STATS.labels(name).set(value)
        self._status = replace(
            self._status,
            step=self.learner.updates,
            kl=stats["objective/kl"],
            mean_reward=stats["objective/scores"],
        )
        log.info(
            "ppo update %d: reward %.3f kl %.3f",
            self.learner.updates,
            stats["objective/scores"],
            stats["objective/kl"],
        )
        if self.learner.updates % self._publish_every == 0:
            self._announce(self._write_checkpoint(stats))
        return stats

    def _write_checkpoint(self, stats: dict[str, float]) -> Manifest:
        tensors, json_files = policy_checkpoint_files(self.learner.policy)
        return self._store.write(
            POLICY,
            tensors,
            json_files,
            parent_version=self._status.policy_version,
            metadata={"stats": stats, "updates": self.learner.updates},
        )

    def _announce(self, manifest: Manifest) -> None:
        """Publish the checkpoint event, then commit the offsets its data came from."""
        event = checkpoint_event(
            events_pb2.CHECKPOINT_KIND_POLICY, manifest, manifest.metadata.get("stats", {})
        )
        try:
            self._publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
        except BusUnavailable as exc:
            log.warning("could not announce policy v%d yet: %s", manifest.version, exc)
            self._unannounced = manifest
            self._stopping.wait(1.0)
            return
        self._unannounced = None
        self._status = replace(self._status, policy_version=manifest.version)
        PUBLISHED_VERSION.set(manifest.version)
        log.info("published policy v%d", manifest.version)
        self._store.prune(POLICY, keep=self._keep_checkpoints)
        if not self.intake.commit():
            log.warning("offset commit did not finish in time; events may be replayed")
