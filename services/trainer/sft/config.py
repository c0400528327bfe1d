"""The sft stage's settings: the stage's own and the sft training knobs
(`rlhf.training.sft_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf.config import ConfigError, group, setting
from rlhf.training.sft_config import SFTConfig


@dataclass(frozen=True)
class SFTStageConfig:
    consumer_group: str = setting(
        "RLHF_SFT_TRAINER_GROUP", "rlhf-sft-trainer", "sft stage: Kafka consumer group"
    )
    data: str = setting(
        "RLHF_SFT_DATA",
        "",
        "sft stage: JSONL file of {prompt, response} demonstrations to train on",
    )
    round_examples: int = setting(
        "RLHF_SFT_ROUND_EXAMPLES", 16, "sft stage: new corrections that start a training round"
    )
    training: SFTConfig = group(SFTConfig, "sft training")

    def validate(self) -> None:
        if self.data and not Path(self.data).expanduser().is_file():
            raise ConfigError(f"RLHF_SFT_DATA={self.data!r}: no such file")
        if self.round_examples < 1:
            raise ConfigError("RLHF_SFT_ROUND_EXAMPLES must be positive")
