"""The sft stage's work: demonstrations in (user corrections, and a JSONL file), policy
checkpoints out.

A correction is the answer a user wrote instead of the generated one; joined to its generation it
is a demonstration for the same prompt tokens the policy saw. A JSONL file given in
RLHF_SFT_DATA is trained on first. Each round fine-tunes on the new demonstrations, writes the
policy and the stage's state (`sft/state.py`), and the skeleton announces the policy and only
then commits the offsets that state covers.

Run it before the ppo stage, not beside it: both publish policy versions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import EventConsumer, Publisher
from rlhf.checkpoints import POLICY, SFT_STATE, CheckpointStore, Manifest
from rlhf.joining import FeedbackJoin, Joined
from rlhf.models import policy_checkpoint_files
from rlhf.training.sft import Demonstration, SFTLearner, make_demonstration

from ..stage import COLLECTING, TRAINING, ConsumerThread, Stage
from .state import SFTIntakeState, write_state

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
        self._join = FeedbackJoin()
        self._encode = encode
        self._max_tokens = max_tokens
        self.demos: list[Demonstration] = []

    def take(self) -> list[Demonstration]:
        """The demonstrations collected so far (no longer held here)."""
        with self.lock:
            demos, self.demos = self.demos, []
            return demos

    def snapshot(self) -> SFTIntakeState:
        with self.lock:
            return SFTIntakeState(
                offsets=dict(self.offsets),
                join=self._join.snapshot(),
                demos=list(self.demos),
                counters={"feedback_consumed": self.feedback_consumed},
            )

    def restore(self, state: SFTIntakeState) -> None:
        """Start from a checkpoint's intake (call before `start`)."""
        with self.lock:
            self.offsets = dict(state.offsets)
            self._join.restore(state.join)
            self.demos = list(state.demos)
            self.feedback_consumed = int(state.counters.get("feedback_consumed", 0))

    def handle(self, record: bus.Record) -> None:
        if record.topic == bus.GENERATIONS:
            joined = self._join.add_generation(record.message)
        else:
            self.feedback_consumed += 1
            if record.message.feedback.WhichOneof("signal") != "correction":
                return
            joined = self._join.add_feedback(record.message)
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


class SFTRounds(Stage):
    """Trains whenever enough demonstrations arrived; publishes each round's policy."""

    name = "sft"
    idle_wait = 0.5

    def __init__(
        self,
        learner: SFTLearner,
        intake: CorrectionIntake,
        store: CheckpointStore,
        publisher: Publisher,
        round_examples: int,
        start_version: int,
        initial: list[Demonstration],
        initial_metadata: dict[str, str] | None = None,
        keep_states: int = 2,
    ) -> None:
        super().__init__(intake, store, publisher)
        self.learner = learner
        self.intake: CorrectionIntake = intake
        self._round_examples = round_examples
        self._keep_states = keep_states
        # A file's demonstrations make the first round, however many there are.
        self._file = list(initial)
        self._file_metadata = initial_metadata or {}
        self.update_status(policy_version=start_version)

    def live_status(self) -> dict[str, Any]:
        return {"pending_prompts": len(self._file) + len(self.intake.demos)}

    def work(self) -> bool:
        waiting = len(self.intake.demos)
        if not self._file and waiting < self._round_examples:
            self.set_phase(
                COLLECTING, f"{waiting} of {self._round_examples} corrections for the next round"
            )
            return False
        with self.intake.lock:  # the demonstrations trained on and the offsets they cover
            demos = self._file + self.intake.take()
            state = self.intake.snapshot()
        self.set_phase(TRAINING, f"fine-tuning on {len(demos)} demonstrations")
        self.run_round(demos, state)
        return True

    def run_round(self, demos: list[Demonstration], state: SFTIntakeState) -> dict[str, float]:
        stats = self.learner.train(demos)
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
        write_state(self._store, state, metadata={"policy_version": manifest.version})
        self._file, self._file_metadata = [], {}  # the file's round is done
        self.update_status(step=self.learner.steps, metrics=stats)
        self.checkpoint_written(manifest, state.offsets)
        return stats

    def announced(self, manifest: Manifest) -> None:
        self.update_status(policy_version=manifest.version)

    def prune(self) -> None:
        self._store.prune(SFT_STATE, keep=self._keep_states)
