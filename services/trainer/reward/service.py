"""The reward stage's process: the reward model continued from the store, its intake restored
from the newest reward state, and the rounds."""

from __future__ import annotations

from rlhf.checkpoints import REWARD, REWARD_STATE, CheckpointStore
from rlhf.models import load_reward_backbone, reward_from_checkpoint
from rlhf.serving import latest_or_base
from rlhf.training.reward import (
    FeedbackDataset,
    FeedbackExamples,
    ReferenceSamples,
    RewardTrainer,
)

from ..config import TrainerConfig
from ..stage import StageService
from .loop import RewardIntake, RewardRounds


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
            current.model,
            tokenizer,
            settings.training,
            max_tokens=settings.reward_max_tokens,
            incumbent_trained=current.version > 0,
        )
        parts = self.open_intake(
            store,
            settings.consumer_group,
            "reward-trainer",
            lambda consumer: RewardIntake(
                consumer,
                FeedbackExamples(),
                FeedbackDataset(settings.training.heldout_fraction),
                ReferenceSamples(seed=settings.training.seed),
            ),
            REWARD_STATE,
        )
        self.serve(
            RewardRounds(
                parts, trainer, settings.round_examples, current.version, settings.round_growth
            ),
            store,
        )
