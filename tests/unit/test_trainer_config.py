"""The trainer's stages share one configuration; the reward stage's settings reach its loop."""

import pytest

from rlhf.config import ConfigError, load_config
from services.trainer.config import TrainerConfig
from services.trainer.reward_stage import reward_training_config


def test_ppo_is_the_default_stage_and_reward_is_accepted():
    assert load_config(TrainerConfig, {}).stage == "ppo"
    assert load_config(TrainerConfig, {"RLHF_TRAINER_STAGE": "reward"}).stage == "reward"


def test_an_unknown_stage_is_refused_by_name():
    with pytest.raises(ConfigError, match="RLHF_TRAINER_STAGE"):
        load_config(TrainerConfig, {"RLHF_TRAINER_STAGE": "sft"})


@pytest.mark.parametrize(
    "env",
    [
        {"RLHF_REWARD_HELDOUT_FRACTION": "1.0"},
        {"RLHF_REWARD_STEPS_PER_ROUND": "0"},
        {"RLHF_REWARD_DESIRABLE_WEIGHT": "0"},
    ],
)
def test_unusable_reward_settings_are_refused(env):
    with pytest.raises(ConfigError):
        load_config(TrainerConfig, {"RLHF_TRAINER_STAGE": "reward", **env})


def test_reward_settings_reach_the_training_loop():
    config = load_config(
        TrainerConfig,
        {
            "RLHF_TRAINER_STAGE": "reward",
            "RLHF_REWARD_LEARNING_RATE": "3e-4",
            "RLHF_REWARD_STEPS_PER_ROUND": "12",
            "RLHF_REWARD_TRAINABLE_LAYERS": "-1",
            "RLHF_REWARD_MIN_HELDOUT": "7",
            "RLHF_REWARD_UNDESIRABLE_WEIGHT": "2.5",
            "RLHF_SEED": "9",
        },
    )
    training = reward_training_config(config)
    assert training.learning_rate == 3e-4 and training.steps_per_round == 12
    assert training.trainable_layers == -1 and training.min_heldout == 7
    assert training.undesirable_weight == 2.5 and training.seed == 9
