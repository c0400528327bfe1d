"""The reward stage's settings: the stage's own and the reward-model training knobs
(`rlhf.training.reward_config`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import ConfigError, RewardModelSettings, RewardTokenSettings, group, setting
from rlhf.training.reward_config import RewardTrainingConfig


@dataclass(frozen=True)
class RewardStageConfig(RewardModelSettings, RewardTokenSettings):
    consumer_group: str = setting(
        "RLHF_REWARD_TRAINER_GROUP",
        "rlhf-reward-trainer",
        "reward stage: Kafka consumer group (not the ppo stage's: both read every event)",
    )
    round_examples: int = setting(
        "RLHF_REWARD_ROUND_EXAMPLES", 64, "reward stage: new examples that start a training round"
    )
    round_growth: float = setting(
        "RLHF_REWARD_ROUND_GROWTH",
        0.0,
        "reward stage, once a reward model is published: a round also waits for this fraction "
        "of the examples earlier rounds had (0.5: rounds at 64, 128, 192, 288, 432... "
        "examples), so retraining on everything costs CPU in proportion to the data, not its "
        "square; 0 = every RLHF_REWARD_ROUND_EXAMPLES",
    )
    training: RewardTrainingConfig = group(RewardTrainingConfig, "reward training")

    def validate(self) -> None:
        if self.round_examples < 1:
            raise ConfigError("RLHF_REWARD_ROUND_EXAMPLES must be positive")
        if self.round_growth < 0:
            raise ConfigError("RLHF_REWARD_ROUND_GROWTH must be >= 0")
