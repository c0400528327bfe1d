"""The sft knobs (`RLHF_SFT_*`), each a setting; free of heavy imports, so the offline importer
(which refuses demonstrations longer than the sft stage trains on) can read them cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import ConfigError, SeedSettings, setting


@dataclass(frozen=True)
class SFTConfig(SeedSettings):
    """The sft knobs (`RLHF_SFT_*`); the trainer's sft stage and the offline importer (which
    refuses demonstrations longer than `max_tokens`) read the same ones."""

    learning_rate: float = setting("RLHF_SFT_LEARNING_RATE", 2e-5, "AdamW learning rate")
    batch_size: int = setting("RLHF_SFT_BATCH_SIZE", 4, "demonstrations per gradient step")
    epochs: int = setting("RLHF_SFT_EPOCHS", 2, "passes over each round's demonstrations")
    max_grad_norm: float = setting(
        "RLHF_SFT_MAX_GRAD_NORM", 1.0, "gradients are clipped to this global norm"
    )
    max_tokens: int = setting(
        "RLHF_SFT_MAX_TOKENS", 512, "longest prompt + answer trained on (longer ones are refused)"
    )

    def validate(self) -> None:
        if min(self.batch_size, self.epochs, self.max_tokens) < 1 or self.learning_rate <= 0:
            raise ConfigError("sft batch size, epochs, max tokens and learning rate must be > 0")
