"""The sft stage: demonstrations in (user corrections, and a JSONL file), policy checkpoints out.

A correction is the answer a user wrote instead of the generated one; joined to its generation it
is a demonstration for the same prompt tokens the policy saw. A JSONL file given in RLHF_SFT_DATA
is trained on first. Each round fine-tunes on the new demonstrations, writes and announces a policy
checkpoint, and only then commits the offsets of the corrections it used.

Run it before the ppo stage, not beside it: both publish policy versions.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.bus import EventConsumer, Publisher
from rlhf.checkpoints import POLICY, CheckpointError, CheckpointStore
from rlhf.joining import FeedbackJoin, Joined
from rlhf.models import (
    chat_text,
    encode_text,
    load_base_policy,
    load_tokenizer,
    policy_checkpoint_files,
    policy_from_checkpoint,
)
from rlhf.serving import latest_or_base
from rlhf.training.sft import (
    Demonstration,
    Prompt,
    PromptEncoder,
    SFTConfig,
    SFTLearner,
    make_demonstration,
    read_demonstrations,
)
from rlhf.v1 import events_pb2

from .config import TrainerConfig
from .loop import ConsumerThread, RoundsLoop, Status, announce
from .servicer import StageService, TrainerServicer

log = logging.getLogger(__name__)

Encode = Callable[[str], list[int]]
SFT_DATA_SHA = "sft_data_sha256"

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
        self.feedback_consumed = 0

    def take(self) -> tuple[list[Demonstration], dict[tuple[str, int], int]]:
        """The demonstrations collected so far and the offsets they come from, so a commit
        after training never covers corrections that arrived during the round."""
        with self.lock:
            demos, self.demos = self.demos, []
            return demos, dict(self.offsets)

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


class SFTRounds(RoundsLoop):
    """Trains whenever enough demonstrations arrived; publishes each round's policy."""

    stage = "sft"

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
    ) -> None:
        super().__init__()
        self.learner = learner
        self.intake = intake
        self._store = store
        self._publisher = publisher
        self._round_examples = round_examples
        self._waiting = list(initial)
        self._covered: dict[tuple[str, int], int] = {}
        self._initial_metadata = initial_metadata or {}
        self._status = Status(stage="sft", policy_version=start_version)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sft-rounds", daemon=True)

    @property
    def status(self) -> Status:
        return replace(
            self._status,
            pending_prompts=len(self._waiting) + len(self.intake.demos),
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
        # A file's demonstrations make the first round, however many there are.
        ready = bool(self._waiting)
        while not self._stopping.is_set():
            demos, self._covered = self.intake.take()
            self._waiting.extend(demos)
            ready = ready or len(self._waiting) >= self._round_examples
            if self.paused or not ready:
                self._stopping.wait(0.5)
                continue
            demos, self._waiting, ready = self._waiting, [], False
            try:
                self.run_round(demos)
            except Exception:  # a failing round must not stop the stage for good
                log.exception("sft round on %d demonstrations failed", len(demos))
                self._stopping.wait(5.0)

    def run_round(self, demos: list[Demonstration]) -> dict[str, float]:
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
            metadata={"stats": stats, "stage": "sft", **self._initial_metadata},
        )
        while not announce(self._publisher, manifest) and not self._stopping.is_set():
            self._stopping.wait(1.0)
        self._initial_metadata = {}  # the file's round is done
        self._status = replace(
            self._status, policy_version=manifest.version, step=self.learner.steps, metrics=stats
        )
        if not self.intake.commit(offsets=self._covered):
            log.warning("offset commit did not finish in time; corrections may be replayed")
        return stats


class SFTTrainerService(StageService):
    """The trainer process running the sft stage (RLHF_TRAINER_STAGE=sft)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        store = CheckpointStore(config.checkpoint_dir)
        tokenizer = load_tokenizer(config.cache_dir)
        current = latest_or_base(
            store,
            POLICY,
            policy_from_checkpoint,
            lambda: load_base_policy(config.policy_model, config.cache_dir),
        )

        def encode(text: str) -> list[int]:
            return encode_text(tokenizer, text)

        def encode_prompt(prompt: Prompt) -> list[int]:
            return encode(prompt if isinstance(prompt, str) else chat_text(tokenizer, prompt))

        initial: list[Demonstration] = []
        file_metadata: dict[str, str] = {}
        if config.sft_data:
            digest = hashlib.sha256(Path(config.sft_data).read_bytes()).hexdigest()
            file_metadata = {SFT_DATA_SHA: digest}
            if trained_on(store, digest):
                log.info("%s was trained on already (same sha256); not again", config.sft_data)
            else:
                initial = load_file(
                    Path(config.sft_data), encode_prompt, encode, config.sft_max_tokens
                )
        learner = SFTLearner(
            current.model,
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            SFTConfig(
                learning_rate=config.sft_learning_rate,
                batch_size=config.minibatch_size,
                epochs=config.sft_epochs,
                seed=config.seed,
            ),
        )
        self.publisher = Publisher(config.kafka_bootstrap, client_id="sft-trainer")
        consumer = EventConsumer(
            config.kafka_bootstrap,
            {bus.GENERATIONS: events_pb2.GenerationEvent, bus.FEEDBACK: events_pb2.FeedbackEvent},
            group_id=config.sft_group,
            dead_letters=self.publisher,
            client_id="sft-trainer",
            max_poll_interval_ms=config.max_poll_interval_ms,
        )
        self.intake = CorrectionIntake(consumer, encode, config.sft_max_tokens)
        self.loop = SFTRounds(
            learner,
            self.intake,
            store,
            self.publisher,
            round_examples=config.sft_round_examples,
            start_version=current.version,
            initial=initial,
            initial_metadata=file_metadata if initial else None,
        )
        self.servicer = TrainerServicer(self.loop, store, POLICY)


def trained_on(store: CheckpointStore, digest: str) -> bool:
    """Whether a policy in the store came from a round on the demonstrations file with this
    sha256 (a restarted pod must not train the same file again on top of itself)."""
    for version in store.versions(POLICY):
        try:
            manifest, _ = store.read_manifest(POLICY, version)
        except CheckpointError:
            continue
        if manifest.metadata.get(SFT_DATA_SHA) == digest:
            return True
    return False


def load_file(
    path: Path, encode_prompt: PromptEncoder, encode: Encode, max_tokens: int
) -> list[Demonstration]:
    """The file's demonstrations; rejected lines are logged with their line number."""
    demos, rejected = read_demonstrations(path, encode_prompt, encode, max_tokens)
    for bad in rejected[:20]:
        log.warning("%s:%d skipped: %s", path, bad.line, bad.reason)
    DEMONSTRATIONS.labels("file", "accepted").inc(len(demos))
    DEMONSTRATIONS.labels("file", "rejected").inc(len(rejected))
    log.info("%s: %d demonstrations, %d lines rejected", path, len(demos), len(rejected))
    return demos
