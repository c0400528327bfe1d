"""The reward stage's work: joined feedback in, reward-model training rounds, reward models out.

The intake turns generation and feedback events into labelled examples (`rlhf.training.reward`)
and keeps a sample of reference answers. A round starts whenever enough new examples arrived:
it trains the candidate on every example so far, and a candidate that passes the held-out gate
is written to the store. After every round, published or not, the stage writes its state (the
join, every example, the reference sample and the offsets they cover: kind `reward-state`) and
the skeleton announces the new reward model, if any, then commits exactly those offsets: a
restarted stage has every rating it had consumed.
"""

from __future__ import annotations

import logging
import math

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import EventConsumer
from rlhf.checkpoints import REWARD, REWARD_STATE, Manifest
from rlhf.models import reward_checkpoint_files
from rlhf.training.reward import (
    DataSnapshot,
    FeedbackDataset,
    FeedbackExamples,
    ReferenceSamples,
    RewardTrainer,
    RoundResult,
)
from rlhf.training.state import IntakeState

from ..stage import ConsumerThread, RoundsStage, StageParts

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
        super().__init__(consumer, "reward-intake", join=examples.join)
        self.examples = examples
        self.dataset = dataset
        self.reference = reference

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

    def save_held(self, state: IntakeState) -> None:
        state.data.update(dataset=self.dataset.state(), reference=self.reference.state())
        state.counters["unresolved_ranked"] = self.examples.unresolved_ranked

    def restore_held(self, state: IntakeState) -> None:
        self.dataset.restore(state.data["dataset"])
        self.reference.restore(state.data["reference"])
        self.examples.unresolved_ranked = state.counters.get("unresolved_ranked", 0)


def _finite(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if not math.isnan(v)}


class RewardRounds(RoundsStage):
    """Runs a training round whenever enough new examples arrived; publishes what passes."""

    name = "reward"
    product_kind, state_kind = REWARD, REWARD_STATE

    def __init__(
        self,
        parts: StageParts,
        trainer: RewardTrainer,
        round_examples: int,
        start_version: int,
        round_growth: float = 0.0,
    ) -> None:
        super().__init__(parts, round_examples, round_growth, reward_version=start_version)
        self.trainer = trainer
        self.intake: RewardIntake = parts.intake  # type: ignore[assignment]

    def pending(self) -> int:
        return self.intake.dataset.fresh

    def collected(self) -> int:
        return sum(self.intake.dataset.sizes().values())

    def round_size(self) -> int:
        # Until a first reward model is published PPO waits for it: every round is a chance.
        if self._status.reward_version == 0:
            return self.round_examples
        return super().round_size()

    def take(self) -> DataSnapshot:
        return self.intake.dataset.snapshot()

    def train_round(self, data: DataSnapshot, state: IntakeState) -> RoundResult:
        """One round on everything collected so far; publishes the candidate if it passed,
        and writes the stage's state either way."""
        result = self.trainer.round(data, self.intake.reference.samples(), self.stopping)
        self._export(result)
        manifest = None
        if result.promoted:
            ROUNDS.labels("published").inc()
            manifest = self._write_reward_model(result)
        else:
            ROUNDS.labels("regressed").inc()
            log.warning("reward round %d not published: %s", self.trainer.rounds, result.reasons)
        self.write_state(
            state, {"round": self.trainer.rounds, "reward_version": self._served_version()}
        )
        self.checkpoint_written(manifest, state.offsets)
        return result

    def _served_version(self) -> int:
        """The newest reward model written (the one the next round has to beat)."""
        return self._store.latest_version(REWARD) or self._status.reward_version

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
        metrics = {
            **_finite(served, "heldout"),
            **_finite(agreement, "agreement"),
            **{k: v for k, v in result.gate.items() if math.isfinite(v)},
        }
        self.update_status(step=self.trainer.rounds, metrics=metrics)
        self.verdict = (
            f"round {self.trainer.rounds} published"
            if result.promoted
            else f"round {self.trainer.rounds} not published: {'; '.join(result.reasons)}"
        )
        log.info(
            "reward round %d: candidate %s, served %s",
            self.trainer.rounds,
            _brief(result.candidate),
            _brief(result.incumbent),
        )

    def _write_reward_model(self, result: RoundResult) -> Manifest:
        assert result.normalisation is not None
        shift, scale = result.normalisation
        metrics = {
            **_finite(result.candidate, "heldout"),
            **_finite(result.incumbent, "parent_heldout"),
            "normalisation/shift": shift,
            "normalisation/scale": scale,
            "round": float(self.trainer.rounds),
            **{k: v for k, v in result.gate.items() if math.isfinite(v)},
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

    def announced(self, manifest: Manifest) -> None:
        self.update_status(reward_version=manifest.version)
        PUBLISHED_VERSION.set(manifest.version)


def _brief(metrics: dict[str, float]) -> str:
    names = ("pairwise_accuracy", "thumbs_auc", "brier")
    return " ".join(f"{n}={metrics.get(n, math.nan):.3f}" for n in names)
