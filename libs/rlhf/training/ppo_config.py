"""The PPO algorithm's knobs, each one a setting a deployment can change (`RLHF_PPO_*`).

`rlhf.training.ppo.ppo_step` reads them; the trainer's ppo stage nests this class into its own
configuration, so `rlhf-trainer --help` and docs/operations.md list every field with its help.
Defaults follow TRL's PPO for language models where this platform has no measured reason to
differ (noted per field).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.algorithms import ppo as algo
from rlhf.config import ConfigError, SeedSettings, setting

KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True)
class PPOConfig(SeedSettings):
    ppo_epochs: int = setting("RLHF_PPO_EPOCHS", 2, "passes over each rollout batch")
    minibatch_size: int = setting(
        "RLHF_PPO_MINIBATCH_SIZE", 4, "sequences per gradient step (over all data-parallel ranks)"
    )
    learning_rate: float = setting(
        "RLHF_PPO_LEARNING_RATE", 1e-5, "AdamW learning rate of the policy and value head"
    )
    clip_range: float = setting(
        "RLHF_PPO_CLIP_RANGE", 0.2, "policy ratio clip: ratios outside 1 +- this stop the gradient"
    )
    clip_range_value: float = setting(
        "RLHF_PPO_CLIP_RANGE_VALUE", 0.2, "value clip around the old value estimate"
    )
    vf_coef: float = setting("RLHF_PPO_VF_COEF", 0.1, "weight of the value loss in the PPO loss")
    gamma: float = setting("RLHF_PPO_GAMMA", 1.0, "discount per response token (GAE)")
    lam: float = setting("RLHF_PPO_LAM", 0.95, "GAE lambda: bias/variance of the advantages")
    temperature: float = setting(
        "RLHF_PPO_TEMPERATURE",
        0.7,
        "rollout sampling temperature; the update's logprobs are taken at the same temperature",
    )
    kl_estimator: str = setting(
        "RLHF_PPO_KL_ESTIMATOR",
        "k1",
        "per-token KL estimate in the reward: k1 (log ratio, unbiased) or k3 (always >= 0)",
    )
    init_kl_coef: float = setting(
        "RLHF_PPO_INIT_KL_COEF", 0.05, "initial coefficient of the KL penalty to the reference"
    )
    adaptive_kl: bool = setting(
        "RLHF_PPO_ADAPTIVE_KL",
        True,
        "adapt the KL coefficient towards RLHF_PPO_TARGET_KL (false: keep the initial one)",
    )
    target_kl: float = setting(
        "RLHF_PPO_TARGET_KL", 6.0, "adaptive KL controller target, nats per response"
    )
    kl_horizon: int = setting(
        "RLHF_PPO_KL_HORIZON",
        10000,
        "adaptive KL controller horizon in samples: smaller moves the coefficient faster",
    )
    max_grad_norm: float = setting(
        "RLHF_PPO_MAX_GRAD_NORM", 1.0, "gradients are clipped to this global norm"
    )
    whiten_advantages: bool = setting(
        "RLHF_PPO_WHITEN_ADVANTAGES", True, "normalise advantages to mean 0, std 1 per batch"
    )
    no_eos_penalty: float = setting(
        "RLHF_PPO_NO_EOS_PENALTY",
        -1.0,
        "added to the reward model's score of a response that never ends (no EOS within the "
        "token budget), so rambling until cut off does not pay; 0 disables it",
    )
    importance_cap: float = setting(
        "RLHF_PPO_IS_CAP",
        2.0,
        "pool rollouts: cap of each token's importance weight pi_trainer / pi_pool (>= 1); "
        "in-process rollouts are on-policy and never weighted",
    )

    def validate(self) -> None:
        if self.ppo_epochs < 1 or self.minibatch_size < 1:
            raise ConfigError("RLHF_PPO_EPOCHS and RLHF_PPO_MINIBATCH_SIZE must be positive")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(
                f"RLHF_PPO_KL_ESTIMATOR={self.kl_estimator!r}: expected one of {KL_ESTIMATORS}"
            )
        if not (self.temperature > 0 and self.learning_rate > 0 and self.max_grad_norm > 0):
            raise ConfigError(
                "RLHF_PPO_TEMPERATURE, RLHF_PPO_LEARNING_RATE and RLHF_PPO_MAX_GRAD_NORM must "
                "be > 0"
            )
        if min(self.clip_range, self.clip_range_value, self.vf_coef) < 0:
            raise ConfigError("PPO clip ranges and RLHF_PPO_VF_COEF must be >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("RLHF_PPO_GAMMA and RLHF_PPO_LAM must be in [0, 1]")
        if self.init_kl_coef < 0 or self.target_kl <= 0 or self.kl_horizon < 1:
            raise ConfigError(
                "RLHF_PPO_INIT_KL_COEF must be >= 0, RLHF_PPO_TARGET_KL > 0 and "
                "RLHF_PPO_KL_HORIZON >= 1"
            )
        if not self.importance_cap >= 1:
            raise ConfigError("RLHF_PPO_IS_CAP must be >= 1")

    def make_kl_controller(self) -> algo.KLController:
        if self.adaptive_kl:
            return algo.AdaptiveKLController(self.init_kl_coef, self.target_kl, self.kl_horizon)
        return algo.FixedKLController(self.init_kl_coef)
