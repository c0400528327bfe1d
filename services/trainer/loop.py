"""The online PPO loop: joined feedback in, PPO updates, policy checkpoints out.

Two threads. The intake thread owns the Kafka consumer: it polls generations and feedback, joins
them and queues the prompts that received feedback; it also commits offsets when asked, because a
KafkaConsumer must only be used from one thread. The training thread takes a batch of prompts,
runs a PPO iteration (rollouts from the trainer's policy, scored by the reward service), and every
`publish_every` updates writes a checkpoint: trainer state (including the intake's join state and
the offsets it covers) and then the policy, announces the policy, and only then commits those
offsets. A restarted trainer resumes from the state and seeks to its offsets, so every feedback
event is used exactly once across crashes (the join also drops replayed event ids).

Operator commands (checkpoint now, roll back) run on the training thread between updates, so
they never race an update.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import BusUnavailable, EventConsumer, Publisher
from rlhf.checkpoints import POLICY, PPO_STATE, REWARD, CheckpointStore, Manifest
from rlhf.clients import RewardUnavailable
from rlhf.joining import FeedbackJoin, Joined, Ledger
from rlhf.models import policy_from_checkpoint
from rlhf.scoring import reward_prompt
from rlhf.training.distributed import ShardFailed
from rlhf.training.online import PPOLearner, Scorer
from rlhf.v1 import events_pb2

from .lockstep import Lockstep
from .ppo_state import IntakeSnapshot, write_checkpoint

log = logging.getLogger(__name__)

STATS = Gauge("rlhf_trainer_stat", "last PPO statistics, named like TRL's", ["name"])
UPDATES = Counter("rlhf_trainer_updates_total", "PPO updates done")
FEEDBACK_CONSUMED = Counter("rlhf_trainer_feedback_consumed_total", "feedback events consumed")
FEEDBACK_USED = Counter(
    "rlhf_trainer_feedback_used_total", "feedback events whose prompts a PPO update trained on"
)
PUBLISHED_VERSION = Gauge("rlhf_trainer_published_version", "last policy version published")
FAILED_BATCHES = Counter("rlhf_trainer_failed_batches_total", "PPO iterations that raised")
PENDING = Gauge("rlhf_trainer_pending_prompts", "joined prompts waiting for a rollout")
STALE = Counter(
    "rlhf_trainer_stale_prompts_total", "joined prompts dropped as older than the staleness bound"
)
STALENESS = Gauge(
    "rlhf_trainer_data_staleness_seconds", "age of the oldest prompt in the last PPO batch"
)
LAG = Gauge("rlhf_trainer_consumer_lag", "events in the input topics not consumed yet")
PAUSED = Gauge("rlhf_trainer_paused", "1 while an operator has paused training")
KL_WARNINGS = Counter(
    "rlhf_trainer_kl_warnings_total", "PPO updates whose KL was negative or exploded", ["kind"]
)
ROLLBACKS = Counter("rlhf_trainer_rollbacks_total", "operator rollbacks of the policy")

# A joined queue this long pauses fetching until training has taken half of it.
MAX_QUEUED = 10_000
# A sampled k1 KL estimate of a few hundredths below 0 is noise; below this it is a bug
# (sampling and scoring temperatures or masks differ).
NEGATIVE_KL_TOLERANCE = -0.05
COMMAND_TIMEOUT = 600.0
ANNOUNCED = {
    POLICY: (events_pb2.CHECKPOINT_KIND_POLICY, bus.POLICY_CHECKPOINTS),
    REWARD: (events_pb2.CHECKPOINT_KIND_REWARD, bus.REWARD_CHECKPOINTS),
}


class Unsupported(Exception):
    """A control-plane command the stage does not offer (FAILED_PRECONDITION)."""


class PauseSwitch:
    """The operator's pause for a stage loop: its thread takes no new work while paused (the
    intake goes on consuming)."""

    def __init__(self) -> None:
        self._paused = threading.Event()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        self._paused.set()
        PAUSED.set(1)
        log.info("training paused")

    def resume(self) -> None:
        self._paused.clear()
        PAUSED.set(0)
        log.info("training resumed")


class RoundsLoop(PauseSwitch):
    """A stage that publishes when its own rounds end (sft, reward): no checkpoint on demand
    and no rollback, which belong to the ppo stage and the served policy."""

    stage = ""

    def checkpoint_now(self, timeout: float = 0.0) -> Manifest:
        raise Unsupported(f"the {self.stage} stage publishes when a round ends, not on demand")

    def rollback(self, version: int, pause: bool, timeout: float = 0.0) -> Manifest:
        raise Unsupported("rollback is offered by the ppo stage (the served policy)")


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
    paused: bool = False
    feedback_used: int = 0
    data_staleness_seconds: float = 0.0
    consumer_lag: int = 0


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


def announce(publisher: Publisher, manifest: Manifest) -> bool:
    """Publish the event announcing a policy or reward checkpoint; False (logged) if the broker
    did not take it, so the caller retries before committing anything."""
    kind, topic = ANNOUNCED[manifest.kind]
    event = checkpoint_event(kind, manifest, manifest.metadata.get("stats", {}))
    try:
        publisher.publish(topic, manifest.kind, event)
    except BusUnavailable as exc:
        log.warning("could not announce %s v%d yet: %s", manifest.kind, manifest.version, exc)
        return False
    log.info("published %s v%d", manifest.kind, manifest.version)
    return True


class ConsumerThread:
    """Owns a Kafka consumer in its own thread and commits its offsets when asked.

    A KafkaConsumer must only be used from one thread, so the training thread cannot commit
    itself: it calls `commit()`, which hands the request over and waits for it. Subclasses say
    what to do with each record (`handle`, called under `lock`, as is the update of `offsets`,
    so a snapshot taken under `lock` is consistent with the offsets it covers).
    """

    def __init__(self, consumer: EventConsumer, name: str) -> None:
        self._consumer = consumer
        self.lock = threading.RLock()
        self.offsets: dict[tuple[str, int], int] = {}
        self.lag = 0
        self._commit_offsets: dict[tuple[str, int], int] | None = None
        self._commit_wanted = threading.Event()
        self._committed = threading.Event()
        self._stopping = threading.Event()
        self._fetch_paused = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self._consumer.close()

    def commit(
        self, timeout: float = 30.0, offsets: dict[tuple[str, int], int] | None = None
    ) -> bool:
        """Ask the consumer thread to commit `offsets` (default: all it consumed); True once
        it has."""
        self._commit_offsets = offsets
        self._committed.clear()
        self._commit_wanted.set()
        return self._committed.wait(timeout)

    def handle(self, record: bus.Record) -> None:
        raise NotImplementedError

    def after_poll(self) -> None:
        """Called after each poll, e.g. to update gauges."""

    def wants_fetch_paused(self, paused: bool) -> bool:
        """Backpressure: whether fetching should be (or stay) paused; never, by default."""
        return False

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                records = self._consumer.poll(timeout=0.5)
                with self.lock:
                    for record in records:
                        self.handle(record)
                    self.offsets.update(self._consumer.positions())
                self.lag = self._consumer.lag()
                self.after_poll()
                self._apply_backpressure()
                if self._commit_wanted.is_set():
                    self._commit_wanted.clear()
                    self._consumer.commit(offsets=self._commit_offsets)
                    self._committed.set()
            except Exception:  # keep consuming through broker restarts and rebalances
                log.exception("%s failed; retrying", self._thread.name)
                self._stopping.wait(1.0)

    def _apply_backpressure(self) -> None:
        paused = self.wants_fetch_paused(self._fetch_paused)
        if paused != self._fetch_paused:
            if paused:
                self._consumer.pause()
            else:
                self._consumer.resume()
            self._fetch_paused = paused
            log.info("%s fetching %s", self._thread.name, "paused" if paused else "resumed")


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
        self.feedback_consumed = 0
        self.skipped_prompts = 0
        self.stale_prompts = 0
        # After a restart or a rebalance, continue where this memory ends.
        consumer.resume_from(lambda: dict(self.offsets))

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


@dataclass(frozen=True)
class LoopSettings:
    batch_size: int = 8
    publish_every: int = 1
    keep_checkpoints: int = 5
    keep_states: int = 2
    kl_alarm: float = 50.0  # nats per sequence: above it, warn that KL exploded
    metrics_log: Path | None = None
    protect: frozenset[int] = frozenset()  # policy versions never pruned (the reference)


class TrainingLoop(PauseSwitch):
    """Runs PPO iterations as joined prompts arrive and publishes policy checkpoints."""

    def __init__(
        self,
        learner: PPOLearner | Lockstep,
        intake: Intake,
        score: Scorer,
        store: CheckpointStore,
        publisher: Publisher,
        settings: LoopSettings,
        start_version: int,
        lora_base_version: int = 0,
    ) -> None:
        super().__init__()
        self.learner = learner
        self.intake = intake
        self._score = score
        self._store = store
        self._publisher = publisher
        self.settings = settings
        self._lora_base = lora_base_version
        self._status = Status(policy_version=start_version, step=learner.updates)
        self._last_stats: dict[str, float] = {}
        self._unannounced: Manifest | None = None
        self._pending_offsets: dict[tuple[str, int], int] | None = None
        self._commands: SimpleQueue[tuple[Callable[[], Any], Future]] = SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-ppo", daemon=True)

    @property
    def status(self) -> Status:
        return replace(
            self._status,
            pending_prompts=len(self.intake),
            feedback_consumed=self.intake.feedback_consumed,
            feedback_used=self.intake.used.count,
            consumer_lag=self.intake.lag,
            paused=self.paused,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=120)

    # Operator commands -----------------------------------------------------------------------

    def checkpoint_now(self, timeout: float = COMMAND_TIMEOUT) -> Manifest:
        """Write and announce a checkpoint of the current policy, after the running update."""
        return self._run_command(lambda: self._publish(self._last_stats), timeout)

    def rollback(self, version: int, pause: bool, timeout: float = COMMAND_TIMEOUT) -> Manifest:
        """Serve policy `version`'s weights again, as a new version, and train on from them.

        Raises CheckpointError if the version is not in the store or fails verification.
        """
        return self._run_command(lambda: self._rollback(version, pause), timeout)

    def _run_command(self, command: Callable[[], Manifest], timeout: float) -> Manifest:
        if not self._thread.is_alive():
            raise RuntimeError("the training loop is not running")
        done: Future = Future()
        self._commands.put((command, done))
        return done.result(timeout=timeout)

    def _serve_commands(self) -> None:
        while True:
            try:
                command, done = self._commands.get_nowait()
            except Empty:
                return
            try:
                done.set_result(command())
            except Exception as exc:
                done.set_exception(exc)

    def _rollback(self, version: int, pause: bool) -> Manifest:
        if pause:
            self.pause()
        weights = policy_from_checkpoint(self._store.load(POLICY, version))
        self.learner.rebase(weights)
        if self.learner.lora.enabled:  # a fresh adapter starts over these weights
            self._lora_base = (self._store.latest_version(POLICY) or 0) + 1
        manifest = self._publish(self._last_stats, rolled_back_from=version)
        ROLLBACKS.inc()
        log.warning("rolled back: policy v%d serves v%d's weights", manifest.version, version)
        return manifest

    # The loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._serve_commands()
            if self._unannounced is not None:
                self._announce(self._unannounced)
            if self.paused or len(self.intake) < self.settings.batch_size:
                self._stopping.wait(0.2)
                continue
            batch, staleness = self.intake.take(self.settings.batch_size)
            if not batch:
                continue
            try:
                self.step(batch, staleness)
            except Exception:  # one bad batch must not stop training for good
                FAILED_BATCHES.inc()
                log.exception("PPO iteration failed; dropping its %d prompts", len(batch))
        self._serve_commands()

    def step(self, batch: list[Joined], staleness: float = 0.0) -> dict[str, float] | None:
        """One PPO iteration on a batch of joined prompts; publishes when it is time."""
        prompts = [list(j.generation.prompt_token_ids) for j in batch]
        # The reward model is asked about the user's words, as it was trained (not the template).
        texts = [reward_prompt(j.generation) for j in batch]
        try:
            stats = self.learner.iterate(prompts, self._score, prompt_texts=texts)
        except (RewardUnavailable, ShardFailed) as exc:
            log.warning("rollouts or rewards unavailable (%s); retrying the batch shortly", exc)
            self.intake.put_back(batch)
            self._stopping.wait(2.0)
            return None
        self.intake.mark_used(batch)
        stats["data/staleness_seconds"] = staleness
        self._record(stats)
        if self.learner.updates % self.settings.publish_every == 0:
            self._publish(stats)
        return stats

    def _record(self, stats: dict[str, float]) -> None:
        """Export an update's statistics: gauges, status, log line, JSONL, KL warnings."""
        UPDATES.inc()
        for name, value in stats.items():
            STATS.labels(name).set(value)
        STALENESS.set(stats["data/staleness_seconds"])
        self._last_stats = stats
        self._status = replace(
            self._status,
            step=self.learner.updates,
            kl=stats["objective/kl"],
            mean_reward=stats["objective/scores"],
            metrics=dict(stats),
            data_staleness_seconds=stats["data/staleness_seconds"],
        )
        log.info(
            "ppo update %d: reward %.3f kl %.3f",
            self.learner.updates,
            stats["objective/scores"],
            stats["objective/kl"],
        )
        self._warn_about_kl(stats["objective/kl"])
        if self.settings.metrics_log is not None:
            self._append_jsonl(stats)

    def _warn_about_kl(self, kl: float) -> None:
        if kl < NEGATIVE_KL_TOLERANCE:
            KL_WARNINGS.labels("negative").inc()
            log.warning(
                "KL to the reference is negative (%.3f nats) at update %d: the logprobs used "
                "for the update do not match the sampling distribution (temperature, top-k/top-p "
                "or masking differ between rollout and scoring)",
                kl,
                self.learner.updates,
            )
        elif kl > self.settings.kl_alarm or not math.isfinite(kl):
            KL_WARNINGS.labels("exploded").inc()
            log.warning(
                "KL to the reference exploded (%.1f nats > %.1f) at update %d: the policy is "
                "drifting far from the reference; lower the learning rate, raise the KL "
                "coefficient or roll back (rlhf rollback)",
                kl,
                self.settings.kl_alarm,
                self.learner.updates,
            )

    def _append_jsonl(self, stats: dict[str, float]) -> None:
        path = self.settings.metrics_log
        assert path is not None
        line = {
            "time": time.time(),
            "step": self.learner.updates,
            "policy_version": self._status.policy_version,
            "feedback_used": self.intake.used.count,
            **stats,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
        except OSError as exc:  # a full or read-only disk must not stop training
            log.warning("could not append to the metrics log %s: %s", path, exc)

    # Checkpoints ------------------------------------------------------------------------------

    def _publish(self, stats: dict[str, float], rolled_back_from: int = 0) -> Manifest:
        """Write trainer state and policy, announce the policy, commit the offsets covered."""
        snapshot = self.intake.snapshot()
        self._pending_offsets = snapshot.offsets
        metadata: dict[str, Any] = {
            "stats": stats,
            "updates": self.learner.updates,
            "data_parallel_ranks": self.learner.world.size,
        }
        if rolled_back_from:
            metadata["rolled_back_from"] = rolled_back_from
        manifest = write_checkpoint(
            self._store,
            self.learner,
            snapshot,
            parent_version=self._status.policy_version,
            lora_base_version=self._lora_base,
            metadata=metadata,
        )
        self._announce(manifest)
        return manifest

    def _announce(self, manifest: Manifest) -> None:
        """Publish the checkpoint event, then commit the offsets its data came from."""
        if not announce(self._publisher, manifest):
            self._unannounced = manifest
            self._stopping.wait(1.0)
            return
        self._unannounced = None
        self._status = replace(self._status, policy_version=manifest.version)
        PUBLISHED_VERSION.set(manifest.version)
        keep = self.settings.keep_checkpoints
        # With LoRA, the adapter's base weights must outlive pruning: resuming needs them.
        protect = self.settings.protect
        if self.learner.lora.enabled:
            protect = protect | {self._lora_base}
        self._store.prune(POLICY, keep=keep, protect=protect)
        self._store.prune(PPO_STATE, keep=self.settings.keep_states)
        if not self.intake.commit(offsets=self._pending_offsets):
            log.warning("offset commit did not finish in time; the next one will cover it")
