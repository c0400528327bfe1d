"""Trainer configuration: what every stage shares, and each stage's own settings as a group
(`ppo/config.py`, `reward/config.py`, `sft/config.py`), each declared once."""

from dataclasses import dataclass
from pathlib import Path

from rlhf.config import (
    CommonConfig,
    ConfigError,
    ConsumerSettings,
    PolicyModelSettings,
    group,
    setting,
)

from .ppo.config import PPOStageConfig
from .release.config import ReleaseStageConfig
from .reward.config import RewardStageConfig
from .sft.config import SFTStageConfig

STAGES = ("ppo", "reward", "sft", "release")


@dataclass(frozen=True)
class TrainerConfig(CommonConfig, PolicyModelSettings, ConsumerSettings):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50054, "gRPC port of the control plane (0 = any)")
    stage: str = setting(
        "RLHF_TRAINER_STAGE",
        "ppo",
        "training stage: ppo, reward (reward-model training), sft (demonstrations) or release "
        "(canaries for new policies, promoted or rolled back on users' thumbs)",
    )
    keep_checkpoints: int = setting(
        "RLHF_KEEP_CHECKPOINTS",
        5,
        "newest checkpoints of what the stage publishes (policies, reward models) kept",
    )
    keep_states: int = setting(
        "RLHF_KEEP_TRAINER_STATES",
        2,
        "newest trainer states (optimizer, join state, training data, offsets) kept",
    )
    metrics_log: str = setting(
        "RLHF_TRAINER_METRICS_LOG",
        "",
        "JSONL file, one line per update ('' = <checkpoint dir>/logs/<stage>.jsonl, off = none)",
    )
    ppo: PPOStageConfig = group(PPOStageConfig, "ppo stage (RLHF_TRAINER_STAGE=ppo)")
    reward: RewardStageConfig = group(RewardStageConfig, "reward stage (RLHF_TRAINER_STAGE=reward)")
    sft: SFTStageConfig = group(SFTStageConfig, "sft stage (RLHF_TRAINER_STAGE=sft)")
    release: ReleaseStageConfig = group(
        ReleaseStageConfig, "release stage (RLHF_TRAINER_STAGE=release)"
    )

    def metrics_log_path(self) -> Path | None:
        if self.metrics_log == "off":
            return None
        if self.metrics_log:
            return Path(self.metrics_log).expanduser()
        return self.checkpoint_dir / "logs" / f"{self.stage}.jsonl"

    def validate(self) -> None:
        super().validate()
        if self.stage not in STAGES:
            raise ConfigError(f"RLHF_TRAINER_STAGE={self.stage!r}: expected one of {STAGES}")
        if self.keep_checkpoints < 1 or self.keep_states < 1:
            raise ConfigError("RLHF_KEEP_CHECKPOINTS and RLHF_KEEP_TRAINER_STATES must be >= 1")
