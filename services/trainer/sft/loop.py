"""The sft stage's work: demonstrations in (user corrections, and a JSONL file), policy
checkpoints out.

A correction is the answer a user wrote instead of the generated one; joined to its generation it
is a demonstration for the same prompt tokens the policy saw. A JSONL file given in
RLHF_SFT_DATA is trained on first. Each round fine-tunes on the new demonstrations, writes the
policy and the stage's state (kind `sft-state`), and the skeleton announces the policy and only
then commits the offsets that state covers.

Run it before the ppo stage, not beside it: both publish policy versions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import EventConsumer
from rlhf.checkpoints import POLICY, SFT_STATE, Manifest
from rlhf.joining import Joined
from rlhf.models import policy_checkpoint_files
from rlhf.training.sft import Demonstration, SFTLearner, make_demonstration
from rlhf.training.state import IntakeState

from ..stage import ConsumerThread, RoundsStage, StageParts

log = logging.getLogger(__name__)

Encode = Callable[[str], list[int]]

DEMONSTRATIONS = Counter(
    "rlhf_sft_demonstrations_total",
    "demonstrations collected, by source and outcome",
    ["source", "outcome"],
)
SFT_LOSS = Gauge("rlhf_sft_loss", "mean answer-token cross-entropy of the last round's last epoch")


class CorrectionIntake(ConsumerThread):
    """Joins correction feedback to its generation and keeps the demonstrations."""

    def __init__(self, consumer: EventConsumer, encode: Encode, max_tokens: int) -> None:
        super().__init__(consumer, "sft-intake")
        self._encode = encode
        self._max_tokens = max_tokens
        self.demos: list[Demonstration] = []

    def take(self) -> list[Demonstration]:
        """The demonstrations collected so far (no longer held here)."""
        with self.lock:
            demos, self.demos = self.demos, []
            return demos

    def save_held(self, state: IntakeState) -> None:
        state.data["demos"] = [[list(d.prompt_ids), list(d.response_ids)] for d in self.demos]

    def restore_held(self, state: IntakeState) -> None:
        self.demos = [Demonstration(tuple(p), tuple(r)) for p, r in state.data["demos"]]

    def handle(self, record: bus.Record) -> None:
        if record.topic == bus.GENERATIONS:
            joined = self.join.add_generation(record.message)
        else:
            self.feedback_consumed += 1
            if record.message.feedback.WhichOneof("signal") != "correction":
                return
            joined = self.join.add_feedback(record.message)
        for item in joined:
            if item.feedback.feedback.WhichOneof("signal") == "correction":
                self._add(item)

    def _add(self, joined: Joined) -> None:
        try:
            demo = make_demonstration(
                joined.generation.prompt_token_ids,
                self._encode(joined.feedback.feedback.correction.text),
                self._max_tokens,
            )
        except ValueError as exc:
            DEMONSTRATIONS.labels("correction", "rejected").inc()
            log.info("correction on %s not used: %s", joined.generation.generation_id, exc)
            return
        DEMONSTRATIONS.labels("correction", "accepted").inc()
        self.demos.append(demo)


class SFTRounds(RoundsStage):
    """Trains whenever enough demonstrations arrived; publishes each round's policy."""

    name = "sft"
    idle_wait = 0.5
    unit = "demonstrations"
    product_kind, state_kind = POLICY, SFT_STATE

    def __init__(
        self,
        parts: StageParts,
        learner: SFTLearner,
        round_examples: int,
        start_version: int,
        initial: list[Demonstration],
        initial_metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(parts, round_examples, policy_version=start_version)
        self.learner = learner
        self.intake: CorrectionIntake = parts.intake  # type: ignore[assignment]
        # A file's demonstrations make the first round, however many there are.
        self._file = list(initial)
        self._file_metadata = initial_metadata or {}

    def pending(self) -> int:
        return len(self._file) + len(self.intake.demos)

    def due(self) -> bool:
        return bool(self._file) or super().due()

    def take(self) -> list[Demonstration]:
        return self._file + self.intake.take()

    def train_round(self, demos: list[Demonstration], state: IntakeState) -> dict[str, float]:
        stats = self.learner.train(demos, self.stopping)
        stats["sft/examples"] = float(len(demos))
        SFT_LOSS.set(stats["sft/loss"])
        log.info(
            "sft round on %d demonstrations: loss %.3f -> %.3f",
            len(demos),
            stats["sft/loss_first_epoch"],
            stats["sft/loss"],
        )
        tensors, json_files = policy_checkpoint_files(self.learner.policy)
        manifest = self._store.write(
            POLICY,
            tensors,
            json_files,
            parent_version=self._status.policy_version,
            metadata={"stats": stats, "stage": "sft", **self._file_metadata},
        )
        self.write_state(state, {"policy_version": manifest.version})
        self._file, self._file_metadata = [], {}  # the file's round is done
        self.update_status(step=self.learner.steps, metrics=stats)
        self.checkpoint_written(manifest, state.offsets)
        return stats

    def announced(self, manifest: Manifest) -> None:
        self.update_status(policy_version=manifest.version)
