"""The one skeleton every trainer stage (ppo, reward, sft) is built on.

A stage is a process with two threads and a control plane:

- the intake (`ConsumerThread`): owns the stage's Kafka consumer of generations and feedback
  (`intake_consumer`, its own consumer group), turns records into what the stage trains on, and
  commits offsets when the work thread asks (a KafkaConsumer must only be used from one thread);
- the work thread (`Stage`): when the stage's `work()` finds enough input, it trains, writes a
  checkpoint (the stage's state, which includes the intake's state and the offsets it covers,
  and what it publishes: a policy or a reward model), and calls `checkpoint_written`: announce
  the product, prune old versions, then commit exactly the offsets that checkpoint covers. A
  restarted stage restores its state and seeks to those offsets, so every event is used once.
  Operator commands (checkpoint now, roll back) run on the work thread between units of work;
- the control plane (`servicer.TrainerServicer`) and the process shell (`StageService`: start,
  and the drain order on SIGTERM).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from prometheus_client import Gauge

from rlhf import bus
from rlhf.auth import OPERATOR, READER, Access, allow, rules
from rlhf.bus import BusUnavailable, EventConsumer, Publisher
from rlhf.checkpoints import (
    POLICY,
    REWARD,
    CheckpointError,
    CheckpointStore,
    Manifest,
    VerifiedCheckpoint,
)
from rlhf.joining import FeedbackJoin
from rlhf.training import Interrupted
from rlhf.training.state import IntakeState, intake_files, intake_from_files
from rlhf.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc

from .config import TrainerConfig
from .servicer import (
    COLLECTING,
    COMMAND_TIMEOUT,
    PAUSED_PHASE,
    TRAINING,
    Status,
    TrainerServicer,
    Unsupported,
    manifest_fields,
)

log = logging.getLogger(__name__)

PAUSED = Gauge("rlhf_trainer_paused", "1 while an operator has paused training")

ANNOUNCED = {
    POLICY: (events_pb2.CHECKPOINT_KIND_POLICY, bus.POLICY_CHECKPOINTS),
    REWARD: (events_pb2.CHECKPOINT_KIND_REWARD, bus.REWARD_CHECKPOINTS),
}
Offsets = dict[tuple[str, int], int]
T = TypeVar("T")
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
# Readers see; only operators steer (five Checkpoint calls would prune every older policy, and
# Rollback with pause forces a version into service).
RULES: dict[str, Access] = rules(
    SERVICE_NAME,
    {
        "GetStatus": allow(READER),
        "ListCheckpoints": allow(READER),
        "Pause": allow(OPERATOR),
        "Resume": allow(OPERATOR),
        "Checkpoint": allow(OPERATOR),
        "Rollback": allow(OPERATOR),
        "Decide": allow(OPERATOR),
    },
)


@dataclass(frozen=True)
class Keep:
    """How many versions a stage keeps in the store after each checkpoint."""

    checkpoints: int | None = 5  # of what it publishes (policies, reward models); None: all
    states: int = 2  # of its own state (trainer state, intake)


# --------------------------------------------------------------------------------------------
# Announcing checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_event(
    kind: events_pb2.CheckpointKind, manifest: Manifest, metrics: dict[str, float]
) -> events_pb2.CheckpointEvent:
    """The event announcing a checkpoint written to the store."""
    return events_pb2.CheckpointEvent(
        kind=kind, manifest_sha256=manifest.sha256, metrics=metrics, **manifest_fields(manifest)
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


def newest_state(
    store: CheckpointStore, kind: str, decode: Callable[[VerifiedCheckpoint], T]
) -> T | None:
    """The newest state of `kind` that verifies and decodes; an older one if the newest does
    not (its offsets are older, so the events after them are read again); None on a first
    start."""
    for version in reversed(store.versions(kind)):
        try:
            state = decode(store.load(kind, version))
        except (CheckpointError, KeyError, TypeError, ValueError) as exc:
            log.error("%s v%d is unusable (%s); trying an older one", kind, version, exc)
            continue
        log.info("restored %s v%d", kind, version)
        return state
    return None


# --------------------------------------------------------------------------------------------
# The intake
# --------------------------------------------------------------------------------------------


def intake_consumer(
    bootstrap: str, group: str, publisher: Publisher, client_id: str, max_poll_interval_ms: int
) -> EventConsumer:
    """The consumer every stage reads generations and feedback with, in its own group (each
    stage sees every event); undecodable records are dead-lettered through `publisher`."""
    return EventConsumer(
        bootstrap,
        {bus.GENERATIONS: events_pb2.GenerationEvent, bus.FEEDBACK: events_pb2.FeedbackEvent},
        group_id=group,
        dead_letters=publisher,
        client_id=client_id,
        max_poll_interval_ms=max_poll_interval_ms,
    )


class ConsumerThread:
    """Owns a Kafka consumer in its own thread and commits its offsets when asked.

    A KafkaConsumer must only be used from one thread, so the work thread cannot commit itself:
    it calls `commit()`, which hands the request over and waits for it. Subclasses say what to
    do with each record (`handle`, called under `lock`, as is the update of `offsets`, so a
    snapshot taken under `lock` is consistent with the offsets it covers). After a restart or a
    rebalance the consumer continues where `offsets` (restored from a checkpoint) ends.
    """

    # The intake's queued event lists by name (saved in its state), for decoding them again.
    messages: dict[str, type[Message]] = {}

    def __init__(
        self, consumer: EventConsumer, name: str, join: FeedbackJoin | None = None
    ) -> None:
        self._consumer = consumer
        self.join = join if join is not None else FeedbackJoin()
        self.lock = threading.RLock()
        self.offsets: Offsets = {}
        self.lag = 0
        self.feedback_consumed = 0
        self._commit_offsets: Offsets | None = None
        self._commit_wanted = threading.Event()
        self._committed = threading.Event()
        self._stopping = threading.Event()
        self._fetch_paused = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        # On every partition assignment (the first, and after a rebalance) continue where this
        # intake's state ends: after a restart, the offsets its restored checkpoint covers.
        self._consumer.resume_from(lambda: dict(self.offsets))
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self._consumer.close()

    def commit(self, offsets: Offsets, timeout: float = 30.0) -> bool:
        """Ask the consumer thread to commit `offsets`; True once it has."""
        self._commit_offsets = offsets
        self._committed.clear()
        self._commit_wanted.set()
        return self._committed.wait(timeout)

    def handle(self, record: bus.Record) -> None:
        raise NotImplementedError

    def snapshot(self) -> IntakeState:
        """What the intake holds and the offsets it covers, consistent (under the lock no
        record is being handled): what a stage checkpoint saves."""
        with self.lock:
            state = IntakeState(
                offsets=dict(self.offsets),
                join=self.join.snapshot(),
                counters={"feedback_consumed": self.feedback_consumed},
            )
            self.save_held(state)
            return state

    def restore(self, state: IntakeState) -> None:
        """Start from a checkpoint's intake (call before `start`)."""
        with self.lock:
            self.offsets = dict(state.offsets)
            self.join.restore(state.join)
            self.feedback_consumed = state.counters.get("feedback_consumed", 0)
            self.restore_held(state)

    def save_held(self, state: IntakeState) -> None:
        """Add the stage's own content (`data`, `messages`, `counters`) to `state`."""

    def restore_held(self, state: IntakeState) -> None:
        """Take the stage's own content back from `state`."""

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
                    # A record whose handling fails is dead-lettered; the rest are handled.
                    self._consumer.dispatch(records, self.handle)
                    self.offsets.update(self._consumer.positions())
                self.lag = self._consumer.lag()
                self.after_poll()
                self._apply_backpressure()
                if self._commit_wanted.is_set():
                    self._commit_wanted.clear()
                    self._consumer.commit(offsets=self._commit_offsets)
                    self._committed.set()
            except BusUnavailable as exc:  # a broker restart or a rebalance: expected, no trace
                log.warning("%s: %s; retrying", self._thread.name, exc)
                self._stopping.wait(1.0)
            except Exception:  # anything else is a bug: its traceback, and keep consuming
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


# --------------------------------------------------------------------------------------------
# The work thread
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageParts:
    """What every stage is built on: its intake, the checkpoint store, the producer that
    announces its checkpoints, and how many versions it keeps."""

    intake: ConsumerThread
    store: CheckpointStore
    publisher: Publisher
    keep: Keep = Keep()


class Stage:
    """A stage's work thread: `work()` when not paused, operator commands between units of
    work, and `checkpoint_written` (announce -> prune -> commit) for every checkpoint.

    Subclasses set `name` and the kinds they write, and implement `work()` (one unit of work
    if there is input for it; False when idle); the ppo stage also offers `checkpoint_now` and
    `rollback`.
    """

    name = ""
    idle_wait = 0.2  # seconds between looks for input when idle
    product_kind = ""  # what it publishes: policy or reward
    state_kind = ""  # its own state versions

    def __init__(self, parts: StageParts, **status: Any) -> None:
        """`status`: the status fields to start with (e.g. the published version)."""
        self.intake = parts.intake
        self._store = parts.store
        self._publisher = parts.publisher
        self.keep = parts.keep
        self._status = Status(stage=self.name, **status)
        self._paused = threading.Event()
        self._unannounced: tuple[Manifest, Offsets] | None = None
        self._commands: SimpleQueue[tuple[Callable[[], Any], Future]] = SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-stage", daemon=True)

    # Status -----------------------------------------------------------------------------------

    @property
    def status(self) -> Status:
        """The stage's status with the intake's live numbers."""
        status = replace(
            self._status,
            feedback_consumed=self.intake.feedback_consumed,
            consumer_lag=self.intake.lag,
            paused=self.paused,
            **self.live_status(),
        )
        if status.paused:
            status = replace(status, phase=PAUSED_PHASE, phase_detail="paused by an operator")
        return status

    def live_status(self) -> dict[str, Any]:
        """Status fields read live from the stage (e.g. pending work), not at updates."""
        return {}

    def set_phase(self, phase: str, detail: str) -> None:
        if phase != self._status.phase:  # not every new count: that would be a line a poll
            log.info("%s stage: %s (%s)", self.name, phase, detail)
        self._status = replace(self._status, phase=phase, phase_detail=detail)

    def update_status(self, **fields: Any) -> None:
        self._status = replace(self._status, **fields)

    # Lifecycle and operator commands ----------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        self._paused.set()
        PAUSED.set(1)
        log.info("%s stage paused", self.name)

    def resume(self) -> None:
        self._paused.clear()
        PAUSED.set(0)
        log.info("%s stage resumed", self.name)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=120)

    def checkpoint_now(self, timeout: float = COMMAND_TIMEOUT) -> Manifest:
        raise Unsupported(f"the {self.name} stage publishes when a round ends, not on demand")

    def rollback(self, version: int, pause: bool, timeout: float = COMMAND_TIMEOUT) -> Manifest:
        raise Unsupported("rollback is offered by the ppo stage (the served policy)")

    def decide(self, verdict: int, timeout: float = COMMAND_TIMEOUT) -> None:
        raise Unsupported("promote and rollback of a canary are the release stage's")

    def run_command(self, command: Callable[[], T], timeout: float) -> T:
        """Run `command` on the work thread, between units of work; its result or exception."""
        if not self._thread.is_alive():
            raise RuntimeError(f"the {self.name} stage is not running")
        done: Future = Future()
        self._commands.put((command, done))
        return done.result(timeout=timeout)

    def queue_command(self, command: Callable[[], object]) -> None:
        """Run `command` on the work thread, between units of work, without waiting for it
        (its exception is logged there: nobody waits for its result)."""

        def logged() -> object:
            try:
                return command()
            except Exception:
                log.exception("a queued command on the %s stage failed", self.name)
                return None

        self._commands.put((logged, Future()))

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

    # The loop ---------------------------------------------------------------------------------

    def work(self) -> bool:
        """One unit of work if there is input for it; False when there was nothing to do."""
        raise NotImplementedError

    def prune(self) -> None:
        """Drop checkpoints beyond what the stage keeps (after each announced checkpoint)."""
        if self.keep.checkpoints is not None:
            self._store.prune(self.product_kind, keep=self.keep.checkpoints)
        if self.state_kind:
            self._store.prune(self.state_kind, keep=self.keep.states)

    def wait(self, seconds: float) -> bool:
        """Sleep unless stopping; True if the stage is stopping."""
        return self._stopping.wait(seconds)

    def stopping(self) -> bool:
        """Whether the stage was asked to stop (a `rlhf.training.Stopping` for long work)."""
        return self._stopping.is_set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._serve_commands()
            if self._unannounced is not None:
                self.checkpoint_written(*self._unannounced)
                continue
            if self.paused:
                self.wait(self.idle_wait)
                continue
            try:
                busy = self.work()
            except Exception:  # one failure must not stop the stage for good
                log.exception("%s stage: unit of work failed", self.name)
                self.wait(5.0)
                continue
            if not busy:
                self.wait(self.idle_wait)
        self._serve_commands()

    def checkpoint_written(self, manifest: Manifest | None, offsets: Offsets) -> bool:
        """A checkpoint covering `offsets` is durable in the store: announce what it publishes
        (`manifest`; None for a state-only checkpoint), then prune, then commit exactly those
        offsets. If the broker does not take the announcement, nothing is committed and the
        loop retries it before any other work. True once committed (or asked to)."""
        if manifest is not None:
            if not announce(self._publisher, manifest):
                self._unannounced = (manifest, offsets)
                self.wait(1.0)
                return False
            self._unannounced = None
            self.announced(manifest)
        self.prune()
        if not self.intake.commit(offsets):
            log.warning("offset commit did not finish in time; the next one will cover it")
        return True

    def announced(self, manifest: Manifest) -> None:
        """Called once a checkpoint's announcement is on the broker (e.g. to update status)."""

    def write_state(self, state: IntakeState, metadata: dict[str, Any]) -> Manifest:
        """Write the next version of this stage's own state (its intake)."""
        tensors, json_files = intake_files(state)
        return self._store.write(self.state_kind, tensors, json_files, metadata=metadata)


class RoundsStage(Stage):
    """A stage that trains in rounds (reward, sft): once enough new examples are in (`due`),
    it takes them and the intake's state together, under the intake's lock, so the round
    trains on exactly what the offsets it then commits cover; `train_round` trains, writes the
    checkpoint and ends with `checkpoint_written`.

    A round waits for `round_examples` new examples, or for `round_growth` times what earlier
    rounds had, whichever is more: rounds that train on everything so far then come at
    geometrically spaced sizes, so their total cost grows with the data rather than with its
    square, and a shared machine keeps CPU for the other stages as the data grows.

    A stop gives a running round up between steps (`train_round` passes `stopping` to the
    learner, which raises `Interrupted`): a round can take a minute or more on a CPU, and
    nothing is lost by dropping it, as the restarted stage reads its examples again."""

    unit = "examples"

    def __init__(
        self, parts: StageParts, round_examples: int, round_growth: float = 0.0, **status: Any
    ) -> None:
        super().__init__(parts, **status)
        self.round_examples = round_examples
        self.round_growth = round_growth
        self.verdict = ""  # what the last round came to, shown while collecting the next

    def pending(self) -> int:
        """New examples waiting for a round."""
        raise NotImplementedError

    def collected(self) -> int:
        """Every example kept so far, the pending ones included (0: not counted)."""
        return 0

    def round_size(self) -> int:
        """New examples the next round waits for."""
        earlier = max(0, self.collected() - self.pending())
        return max(self.round_examples, math.ceil(self.round_growth * earlier))

    def due(self) -> bool:
        return self.pending() >= self.round_size()

    def take(self) -> Any:
        """The round's data (called under the intake's lock)."""
        raise NotImplementedError

    def train_round(self, data: Any, state: IntakeState) -> Any:
        raise NotImplementedError

    def live_status(self) -> dict[str, Any]:
        return {"pending_prompts": self.pending()}

    def work(self) -> bool:
        pending = self.pending()
        if not self.due():
            last = f"; {self.verdict}" if self.verdict else ""
            self.set_phase(
                COLLECTING, f"{pending} of {self.round_size()} new {self.unit} for a round{last}"
            )
            return False
        self.set_phase(TRAINING, f"training a round on {pending} new {self.unit}")
        try:
            self.run_round()
        except Interrupted as exc:
            # Nothing of the round was written and its offsets stay uncommitted: after the
            # restart the stage restores its last state and reads those examples again.
            log.info("%s stage: round given up on stop (%s)", self.name, exc)
        return True

    def run_round(self) -> Any:
        """One round now, on what has come so far; the stage's `train_round` result."""
        with self.intake.lock:  # the data trained on and the offsets it covers, together
            data = self.take()
            state = self.intake.snapshot()
        return self.train_round(data, state)


def restore_intake(store: CheckpointStore, kind: str, intake: ConsumerThread) -> bool:
    """Restore `intake` from the newest usable state of `kind`; False on a first start."""
    state = newest_state(
        store, kind, lambda c: intake_from_files(c.tensors, c.json_files, intake.messages)
    )
    if state is not None:
        intake.restore(state)
    return state is not None


# --------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------


class StageService:
    """What every trainer stage's process shares: the control plane, an intake thread feeding
    a stage's work thread, and the drain order on SIGTERM (stage, intake, clients, producer)."""

    name = "trainer"
    rules = RULES
    config: TrainerConfig
    intake: ConsumerThread
    loop: Stage
    publisher: Publisher
    servicer: trainer_pb2_grpc.TrainerServiceServicer

    def serve(self, loop: Stage, store: CheckpointStore) -> None:
        """Run `loop` behind the control plane, which lists what it publishes."""
        self.loop = loop
        self.servicer = TrainerServicer(loop, store, loop.product_kind)

    def open_intake(
        self,
        store: CheckpointStore,
        group: str,
        client_id: str,
        make: Callable[[EventConsumer], ConsumerThread],
        state_kind: str = "",
        keep_checkpoints: bool = True,
        consumer: Callable[[Publisher], EventConsumer] | None = None,
    ) -> StageParts:
        """A stage's parts: its producer (`self.publisher`: announcements and dead letters),
        its consumer of generations and feedback in `group`, its intake built by `make`
        (`self.intake`), restored from the newest state of `state_kind` when there is one, and
        the retention the config says (checkpoints are not pruned without `keep_checkpoints`).
        `consumer` builds a consumer of other topics than generations and feedback."""
        config = self.config
        self.publisher = Publisher(config.kafka_bootstrap, client_id=client_id)
        if consumer is not None:
            events = consumer(self.publisher)
        else:
            events = intake_consumer(
                config.kafka_bootstrap,
                group,
                self.publisher,
                client_id,
                config.max_poll_interval_ms,
            )
        self.intake = make(events)
        if state_kind:
            restore_intake(store, state_kind, self.intake)
        keep = Keep(config.keep_checkpoints if keep_checkpoints else None, config.keep_states)
        return StageParts(self.intake, store, self.publisher, keep)

    def register(self, server: grpc.Server) -> list[str]:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    def start(self) -> None:
        self.intake.start()
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        self.intake.stop()
        self.close_clients()
        self.publisher.close(timeout=self.config.shutdown_grace_seconds)

    def close_clients(self) -> None:
        """Stage-specific clients to close after the loop stopped using them."""
