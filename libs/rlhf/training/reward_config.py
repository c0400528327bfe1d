"""The reward-model training knobs (`RLHF_REWARD_*`), each a setting a deployment can change.

`rlhf.training.reward.RewardTrainer` reads them; the trainer's reward stage nests this class
into its configuration, so `rlhf-trainer --help` and docs/operations.md list every field.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import ConfigError, SeedSettings, setting


@dataclass(frozen=True)
class RewardTrainingConfig(SeedSettings):
    learning_rate: float = setting("RLHF_REWARD_LEARNING_RATE", 2e-4, "AdamW learning rate")
    batch_size: int = setting(
        "RLHF_REWARD_BATCH_SIZE", 16, "examples per step (a pair counts once, two sequences)"
    )
    steps_per_round: int = setting(
        "RLHF_REWARD_STEPS_PER_ROUND", 80, "gradient steps per training round, at most"
    )
    epochs_per_round: float = setting(
        "RLHF_REWARD_EPOCHS_PER_ROUND",
        4.0,
        "a round takes at most this many passes over the training examples (fewer steps on "
        "little data, so early rounds do not overfit it)",
    )
    trainable_layers: int = setting(
        "RLHF_REWARD_TRAINABLE_LAYERS",
        2,
        "top encoder layers trained with the head (-1 = the whole model)",
    )
    pair_weight: float = setting(
        "RLHF_REWARD_PAIR_WEIGHT", 1.0, "weight of the Bradley-Terry loss on ranked pairs"
    )
    rated_weight: float = setting(
        "RLHF_REWARD_RATED_WEIGHT", 1.0, "weight of the logistic loss on thumbs and scores"
    )
    desirable_weight: float = setting(
        "RLHF_REWARD_DESIRABLE_WEIGHT",
        1.0,
        "weight of thumbs-up (!= 1 rebalances thumbs but biases calibration)",
    )
    undesirable_weight: float = setting(
        "RLHF_REWARD_UNDESIRABLE_WEIGHT", 1.0, "weight of thumbs-down"
    )
    weight_decay: float = setting("RLHF_REWARD_WEIGHT_DECAY", 0.01, "AdamW weight decay")
    max_grad_norm: float = setting(
        "RLHF_REWARD_MAX_GRAD_NORM", 1.0, "gradients are clipped to this global norm"
    )
    eval_batch_size: int = setting(
        "RLHF_REWARD_EVAL_BATCH_SIZE", 64, "pairs per forward pass when evaluating"
    )
    heldout_fraction: float = setting(
        "RLHF_REWARD_HELDOUT_FRACTION",
        0.2,
        "share of generations held out to judge each round's candidate (by a hash of the id)",
    )
    min_heldout: int = setting(
        "RLHF_REWARD_MIN_HELDOUT", 16, "held-out examples needed before publishing"
    )
    gate_confidence: float = setting(
        "RLHF_REWARD_GATE_CONFIDENCE",
        0.9,
        "a candidate is published when it ranks the held-out feedback better than chance "
        "with this confidence, unless it ranks it worse than the served model with it",
    )
    tolerance: float = setting(
        "RLHF_REWARD_TOLERANCE",
        0.0,
        "how much worse a ranking score (the held-out pairs and thumbs ordered right, 0-1) "
        "than the served model's a candidate may have with that confidence and still be "
        "published",
    )

    def validate(self) -> None:
        if min(self.steps_per_round, self.batch_size, self.eval_batch_size) < 1:
            raise ConfigError("reward round sizes must be positive")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError("RLHF_REWARD_HELDOUT_FRACTION must be in (0, 1)")
        if min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise ConfigError("reward thumb weights must be positive")
        if not 0.5 <= self.gate_confidence < 1.0:
            raise ConfigError("RLHF_REWARD_GATE_CONFIDENCE must be in [0.5, 1)")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ConfigError("RLHF_REWARD_TOLERANCE must be in [0, 1] (a ranking score's)")
        if self.epochs_per_round <= 0 or self.min_heldout < 2:
            raise ConfigError(
                "RLHF_REWARD_EPOCHS_PER_ROUND must be > 0 and RLHF_REWARD_MIN_HELDOUT >= 2"
            )
        if self.learning_rate <= 0 or min(self.pair_weight, self.rated_weight) < 0:
            raise ConfigError("RLHF_REWARD_LEARNING_RATE must be > 0 and loss weights >= 0")
