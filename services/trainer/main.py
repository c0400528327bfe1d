"""Trainer entry point: `rlhf-trainer --help` lists its settings; RLHF_TRAINER_STAGE picks the
stage, each in its own folder: ppo (`ppo/service.py`), reward (`reward/service.py`), sft
(`sft/service.py`) or release (`release/service.py`), all built on the one stage skeleton
(`stage.py`)."""

from __future__ import annotations

from rlhf.config import parse_args
from rlhf.server import Service, run_main
from rlhf.training import distributed

from .config import TrainerConfig
from .ppo.service import PPOTrainerService, run_follower
from .release.service import ReleaseTrainerService
from .reward.service import RewardTrainerService
from .sft.service import SFTTrainerService

DESCRIPTION = (
    "Join generations with feedback and train: PPO against the reward service, publishing "
    "policies (RLHF_TRAINER_STAGE=ppo; data parallel under torchrun); the reward model, "
    "publishing reward models (RLHF_TRAINER_STAGE=reward); supervised fine-tuning on "
    "corrections and a demonstrations file (RLHF_TRAINER_STAGE=sft); or canaries for new "
    "policies, promoted or rolled back on users' thumbs (RLHF_TRAINER_STAGE=release)."
)


def build(config: TrainerConfig) -> Service:
    """The service for the configured stage; all share the bootstrap and control plane."""
    if config.stage == "reward":
        return RewardTrainerService(config)
    if config.stage == "sft":
        return SFTTrainerService(config)
    if config.stage == "release":
        return ReleaseTrainerService(config)
    return PPOTrainerService(config)


def main() -> None:
    if distributed.launched_rank() > 0:  # torchrun's other ranks follow rank 0
        return run_follower(parse_args(TrainerConfig, DESCRIPTION))
    run_main("trainer", TrainerConfig, build, DESCRIPTION)


if __name__ == "__main__":
    main()
