"""The reward stage: joined feedback in, reward-model training rounds, reward checkpoints out.

Two threads, like the ppo stage. The intake thread owns the Kafka consumer (its own group): it
turns generation and feedback events into labelled examples and keeps a sample of reference
answers. The rounds thread starts a round whenever enough new examples arrived
(`rlhf.training.reward.RewardTrainer.round`); a round that does not regress on the held-out set
is written to the checkpoint store, announced on the reward checkpoint topic (the reward service
hot-reloads it), and only then are the consumer offsets committed.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import replace

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import EventConsumer, Publisher
from rlhf.checkpoints import REWARD, CheckpointError, CheckpointStore, Manifest
from rlhf.models import load_reward_backbone, reward_checkpoint_files, reward_from_checkpoint
from rlhf.serving import latest_or_base
from rlhf.training.reward import (
    FeedbackDataset,
    FeedbackExamples,
    ReferenceSamples,
    RewardTrainer,
    RewardTrainingConfig,
    RoundResult,
)
from rlhf.v1 import events_pb2

from .config import TrainerConfig
from .loop import ConsumerThread, RoundsLoop, Status, announce
from .servicer import StageService, TrainerServicer

log = logging.getLogger(__name__)

HELDOUT = Gauge(
    "rlhf_reward_trainer_heldout",
    "held-out metrics of the last round's candidate and of the served reward model",
    ["model", "metric"],
)
AGREEMENT = Gauge(
    "rlhf_reward_trainer_agreement",
    "served reward model vs users on feedback it never trained on (pairwise_accuracy, "
    "thumbs_auc): the 'reward model disagrees with users' signal",
    ["metric"],
)
ROUNDS = Counter(
    "rlhf_reward_trainer_rounds_total", "reward training rounds by outcome", ["outcome"]
)
EXAMPLES = Gauge("rlhf_reward_trainer_examples", "examples held, by split", ["split"])
PUBLISHED_VERSION = Gauge(
    "rlhf_reward_trainer_published_version", "last reward model version published"
)
NORMALISATION = Gauge(
    "rlhf_reward_trainer_normalisation", "shift and scale of the last published model", ["param"]
)

# An agreement figure computed on fewer fresh examples than this is too noisy to export.
MIN_AGREEMENT_EXAMPLES = 20
AGREEMENT_METRICS = {"pairwise_accuracy": "pairs", "thumbs_auc": "rated"}


class RewardIntake(ConsumerThread):
    """Turns generation and feedback events into examples and reference answers."""

    def __init__(
        self,
        consumer: EventConsumer,
        examples: FeedbackExamples,
        dataset: FeedbackDataset,
        reference: ReferenceSamples,
    ) -> None:
        super().__init__(consumer, "reward-intake")
        self.examples = examples
        self.dataset = dataset
        self.reference = reference
        self.feedback_consumed = 0

    def handle(self, record: bus.Record) -> None:
        if record.topic == bus.GENERATIONS:
            self.reference.add(record.message)
            self.dataset.add(self.examples.add_generation(record.message))
        else:
            self.feedback_consumed += 1
            self.dataset.add(self.examples.add_feedback(record.message))

    def after_poll(self) -> None:
        for split, size in self.dataset.sizes().items():
            EXAMPLES.labels(split).set(size)


def _finite(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if not math.isnan(v)}


class RewardRounds(RoundsLoop):
    """Runs a training round whenever enough new examples arrived; publishes what passes."""

    stage = "reward"

    def __init__(
        self,
        trainer: RewardTrainer,
        intake: RewardIntake,
        store: CheckpointStore,
        publisher: Publisher,
        round_examples: int,
        start_version: int,
        keep_checkpoints: int = 5,
    ) -> None:
        super().__init__()
        self.trainer = trainer
        self.intake = intake
        self._store = store
        self._publisher = publisher
        self._round_examples = round_examples
        self._keep_checkpoints = keep_checkpoints
        self._status = Status(stage="reward", reward_version=start_version)
        self._unannounced: Manifest | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reward-rounds", daemon=True)

    @property
    def status(self) -> Status:
        return replace(
            self._status,
            pending_prompts=self.intake.dataset.fresh,
            feedback_consumed=self.intake.feedback_consumed,
            consumer_lag=self.intake.lag,
            paused=self.paused,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._unannounced is not None:
                self._announce(self._unannounced)
            elif self.paused:
                self._stopping.wait(0.2)
            elif self.intake.dataset.fresh >= self._round_examples:
                try:
                    self.run_round()
                except (CheckpointError, OSError) as exc:
                    log.error("could not write the reward checkpoint: %s", exc)
                    self._stopping.wait(5.0)
            else:
                self._stopping.wait(0.2)

    def run_round(self) -> RoundResult:
        """One round on everything collected so far; publishes the candidate if it passed."""
        result = self.trainer.round(self.intake.dataset.snapshot(), self.intake.reference.samples())
        self._export(result)
        if not result.promoted:
            ROUNDS.labels("regressed").inc()
            log.warning("reward round %d not published: %s", self.trainer.rounds, result.reasons)
            return result
        ROUNDS.labels("published").inc()
        self._announce(self._write_checkpoint(result))
        return result

    def _export(self, result: RoundResult) -> None:
        # After a promotion the candidate is what will be served.
        served = result.candidate if result.promoted else result.incumbent
        for model, metrics in (("candidate", result.candidate), ("served", served)):
            for name, value in metrics.items():
                if not math.isnan(value):
                    HELDOUT.labels(model, name).set(value)
        agreement = {}
        for name, count in AGREEMENT_METRICS.items():
            value = result.agreement.get(name, math.nan)
            if result.agreement.get(count, 0) >= MIN_AGREEMENT_EXAMPLES and not math.isnan(value):
                AGREEMENT.labels(name).set(value)
                agreement[name] = value
        metrics = {**_finite(served, "heldout"), **_finite(agreement, "agreement")}
        self._status = replace(self._status, step=self.trainer.rounds, metrics=metrics)
        log.info(
            "reward round %d: candidate %s, served %s",
            self.trainer.rounds,
            _brief(result.candidate),
            _brief(result.incumbent),
        )

    def _write_checkpoint(self, result: RoundResult) -> Manifest:
        assert result.normalisation is not None
        shift, scale = result.normalisation
        metrics = {
            **_finite(result.candidate, "heldout"),
            **_finite(result.incumbent, "parent_heldout"),
            "normalisation/shift": shift,
            "normalisation/scale": scale,
            "round": float(self.trainer.rounds),
        }
        tensors, json_files = reward_checkpoint_files(self.trainer.model)
        NORMALISATION.labels("shift").set(shift)
        NORMALISATION.labels("scale").set(scale)
        return self._store.write(
            REWARD,
            tensors,
            json_files,
            parent_version=self._status.reward_version,
            metadata={"stats": metrics, "reasons": result.reasons},
        )

    def _announce(self, manifest: Manifest) -> None:
        """Publish the checkpoint event, then commit the offsets its data came from."""
        if not announce(self._publisher, manifest):
            self._unannounced = manifest
            self._stopping.wait(1.0)
            return
        self._unannounced = None
        self._status = replace(self._status, reward_version=manifest.version)
        PUBLISHED_VERSION.set(manifest.version)
        self._store.prune(REWARD, keep=self._keep_checkpoints)
        if not self.intake.commit():
            log.warning("offset commit did not finish in time; events may be replayed")


def _brief(metrics: dict[str, float]) -> str:
    names = ("pairwise_accuracy", "thumbs_auc", "brier")
    return " ".join(f"{n}={metrics.get(n, math.nan):.3f}" for n in names)


def reward_training_config(config: TrainerConfig) -> RewardTrainingConfig:
    return RewardTrainingConfig(
        learning_rate=config.reward_learning_rate,
        batch_size=config.reward_batch_size,
        steps_per_round=config.reward_steps,
        trainable_layers=config.reward_trainable_layers,
        max_tokens=config.reward_max_tokens,
        desirable_weight=config.reward_desirable_weight,
        undesirable_weight=config.reward_undesirable_weight,
        min_heldout=config.reward_min_heldout,
        tolerance=config.reward_tolerance,
        seed=config.seed,
    )


class RewardTrainerService(StageService):
    """The trainer process running the reward stage (RLHF_TRAINER_STAGE=reward)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        store = CheckpointStore(config.checkpoint_dir)
        base, tokenizer = load_reward_backbone(config.reward_model, seed=config.seed)
        # Continue from the newest published reward model: it is also the one to beat.
        current = latest_or_base(store, REWARD, reward_from_checkpoint, lambda: base)
        trainer = RewardTrainer(current.model, tokenizer, reward_training_config(config))
        self.publisher = Publisher(config.kafka_bootstrap, client_id="reward-trainer")
        consumer = EventConsumer(
            config.kafka_bootstrap,
            {bus.GENERATIONS: events_pb2.GenerationEvent, bus.FEEDBACK: events_pb2.FeedbackEvent},
            group_id=config.reward_group,
            dead_letters=self.publisher,
            client_id="reward-trainer",
            max_poll_interval_ms=config.max_poll_interval_ms,
        )
        self.intake = RewardIntake(
            consumer,
            FeedbackExamples(),
            FeedbackDataset(config.reward_heldout_fraction),
            ReferenceSamples(seed=config.seed),
        )
        self.loop = RewardRounds(
            trainer,
            self.intake,
            store,
            self.publisher,
            round_examples=config.reward_round_examples,
            start_version=current.version,
            keep_checkpoints=config.keep_checkpoints,
        )
        self.servicer = TrainerServicer(self.loop, store, REWARD)
