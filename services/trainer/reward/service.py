"""The reward stage's process: the reward model continued from the store, its intake restored
from the newest reward state, and the rounds."""

from __future__ import annotations

from rlhf.bus import Publisher
from rlhf.checkpoints import REWARD, CheckpointStore
from rlhf.models import load_reward_backbone, reward_from_checkpoint
from rlhf.serving import latest_or_base
from rlhf.training.reward import (
    FeedbackDataset,
    FeedbackExamples,
    ReferenceSamples,
    RewardTrainer,
)

from ..config import TrainerConfig
from ..servicer import TrainerServicer
from ..stage import StageService, intake_consumer
from .loop import RewardIntake, RewardRounds
from .state import restore_state


class RewardTrainerService(StageService):
    """The trainer process running the reward stage (RLHF_TRAINER_STAGE=reward)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        settings = config.reward
        store = CheckpointStore(config.checkpoint_dir)
        base, tokenizer = load_reward_backbone(settings.reward_model, seed=settings.training.seed)
        # Continue from the newest published reward model: it is also the one to beat.
        current = latest_or_base(store, REWARD, reward_from_checkpoint, lambda: base)
        trainer = RewardTrainer(
            current.model, tokenizer, settings.training, max_tokens=settings.reward_max_tokens
        )
        self.publisher = Publisher(config.kafka_bootstrap, client_id="reward-trainer")
        consumer = intake_consumer(
            config.kafka_bootstrap,
            settings.consumer_group,
            self.publisher,
            "reward-trainer",
            config.max_poll_interval_ms,
        )
        self.intake = RewardIntake(
            consumer,
            FeedbackExamples(),
            FeedbackDataset(settings.training.heldout_fraction),
            ReferenceSamples(seed=settings.training.seed),
        )
        restored = restore_state(store)
        if restored is not None:
            self.intake.restore(restored)
        self.loop = RewardRounds(
            trainer,
            self.intake,
            store,
            self.publisher,
            round_examples=settings.round_examples,
            start_version=current.version,
            keep_checkpoints=config.keep_checkpoints,
            keep_states=config.keep_states,
        )
        self.servicer = TrainerServicer(self.loop, store, REWARD)
