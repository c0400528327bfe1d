"""The policy optimisation knobs, each one a setting a deployment can change (`RLHF_PPO_*`).

`rlhf.training.ppo.ppo_step` reads them; the trainer's ppo stage nests this class into its own
configuration, so `rlhf-trainer --help` and docs/operations.md list every field with its help.
Defaults follow TRL's PPO for language models where this platform has no measured reason to
differ (noted per field).

`RLHF_PPO_ALGORITHM` picks the advantage estimator of the one clipped-surrogate update: ppo (a
value head and GAE) or one of the critic-free ones, grpo and rloo, which sample a group of
answers per prompt and take a baseline from the group (`rlhf.algorithms.group`). Everything
else (sampling, scoring, the KL penalty to the reference, the no-EOS penalty, importance
weights, LoRA, data parallel) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algorithms import ppo as algo
from rlhf.config import ConfigError, SeedSettings, setting
from rlhf.models import DTYPES, serving_dtype, width_multiple

KL_ESTIMATORS = ("k1", "k3")
ALGORITHMS = ("ppo", "grpo", "rloo")
LOSS_AGGREGATIONS = ("token", "sequence")


@dataclass(frozen=True)
class PPOConfig(SeedSettings):
    algorithm: str = setting(
        "RLHF_PPO_ALGORITHM",
        "ppo",
        "advantage estimator: ppo (value head and GAE, one answer per prompt), grpo (group mean "
        "baseline) or rloo (leave-one-out baseline); grpo and rloo sample RLHF_PPO_GROUP_SIZE "
        "answers per prompt and train no value head. A checkpoint's optimizer state belongs to "
        "the algorithm that wrote it: resuming under another starts a fresh optimizer",
    )
    group_size: int = setting(
        "RLHF_PPO_GROUP_SIZE",
        4,
        "grpo and rloo: answers sampled and scored per prompt (>= 2), each compared with the "
        "others of its group; RLHF_PPO_BATCH_SIZE prompts make batch x group rollouts",
    )
    grpo_scale_std: bool = setting(
        "RLHF_PPO_GRPO_SCALE_STD",
        False,
        "grpo: divide each group's advantages by the group's reward std, as the GRPO paper "
        "does (false: Dr. GRPO's unscaled advantages; see rlhf/algorithms/group.py)",
    )
    loss_aggregation: str = setting(
        "RLHF_PPO_LOSS_AGGREGATION",
        "token",
        "how the clipped policy loss averages a minibatch: token (every real token weighs the "
        "same, DAPO / Dr. GRPO) or sequence (each answer's token mean, then the mean over "
        "answers, as the GRPO paper; favours short answers)",
    )
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
    min_kl_coef: float = setting(
        "RLHF_PPO_MIN_KL_COEF",
        0.0,
        "the adaptive KL controller's coefficient never goes below this (0: no floor, as in "
        "Ziegler et al.; above RLHF_PPO_INIT_KL_COEF it starts here): keeps a penalty in place "
        "while the KL is under target, so a policy that suddenly moves faster (a new reward "
        "model) is held back at once",
    )
    max_grad_norm: float = setting(
        "RLHF_PPO_MAX_GRAD_NORM", 1.0, "gradients are clipped to this global norm"
    )
    whiten_advantages: bool = setting(
        "RLHF_PPO_WHITEN_ADVANTAGES",
        True,
        "ppo: normalise advantages to mean 0, std 1 per batch (grpo and rloo never do: their "
        "advantages are already relative to the group, and shifting them would move a group "
        "whose answers all scored the same away from 0)",
    )
    no_eos_penalty: float = setting(
        "RLHF_PPO_NO_EOS_PENALTY",
        -1.0,
        "added to the reward model's score of a response that never ends (no EOS within the "
        "token budget), so rambling until cut off does not pay; 0 disables it",
    )
    dtype: str = setting(
        "RLHF_PPO_DTYPE",
        "auto",
        "precision of the policy's and reference's passes (old-policy and reference scoring, "
        "the update's forward and backward) and of in-process rollout decoding: auto "
        "(bfloat16 where the hardware multiplies it natively: a CPU with AMX, a CUDA GPU with "
        "bfloat16; float32 elsewhere), float32 or bfloat16. bfloat16 runs the passes under "
        "autocast over the float32 weights and decodes rollouts on a bfloat16 copy; master "
        "weights, optimizer moments, checkpoints, logprobs, ratios, KL, advantages and losses "
        "stay float32",
    )
    pad_multiple: int = setting(
        "RLHF_PPO_PAD_MULTIPLE",
        0,
        "each batch's sequence width (prompt plus response tokens) is padded up to a multiple "
        "of this (masked: a float32 step is the same to 1e-8, a bfloat16 one within its "
        "rounding): bfloat16 matrix products go through oneDNN, "
        "which builds a kernel per shape, and a width per batch kept the trainer building them "
        "(SmolLM2 in-process, 50 bfloat16 steps of widths 40-130: 122 s, resident memory "
        "past 4.1 GB and growing; padded to 16: 97 s, level at 3.4 GB). 0 (auto): 16 for "
        "bfloat16 passes, 1 (no rounding) for float32, where it changed neither time nor memory",
    )
    importance_cap: float = setting(
        "RLHF_PPO_IS_CAP",
        2.0,
        "pool rollouts, and in-process rollouts decoded in bfloat16 (RLHF_PPO_DTYPE): cap of "
        "each token's importance weight pi_trainer / pi_sampler (>= 1); in-process float32 "
        "rollouts are on-policy and never weighted",
    )

    @property
    def critic_free(self) -> bool:
        """Whether the advantages come from a group of answers rather than a value head."""
        return self.algorithm != "ppo"

    @property
    def answers_per_prompt(self) -> int:
        """Rollouts sampled for each prompt: the group for grpo and rloo, one for ppo."""
        return self.group_size if self.critic_free else 1

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"RLHF_PPO_ALGORITHM={self.algorithm!r}: expected one of {ALGORITHMS}"
            )
        if self.critic_free and self.group_size < 2:
            raise ConfigError(
                f"RLHF_PPO_GROUP_SIZE={self.group_size}: {self.algorithm} needs at least 2 "
                "answers per prompt (the baseline comes from the other answers)"
            )
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ConfigError(
                f"RLHF_PPO_LOSS_AGGREGATION={self.loss_aggregation!r}: expected one of "
                f"{LOSS_AGGREGATIONS}"
            )
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
        if self.min_kl_coef < 0:
            raise ConfigError(f"RLHF_PPO_MIN_KL_COEF must be >= 0, got {self.min_kl_coef}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"RLHF_PPO_DTYPE={self.dtype!r}: use one of {DTYPES}")
        if not self.importance_cap >= 1:
            raise ConfigError("RLHF_PPO_IS_CAP must be >= 1")
        if self.pad_multiple < 0:
            raise ConfigError(f"RLHF_PPO_PAD_MULTIPLE must be >= 0, got {self.pad_multiple}")

    def compute_dtype(self, device: torch.device | str = "cpu") -> torch.dtype:
        """The dtype the policy's and reference's matmuls run in on `device` (RLHF_PPO_DTYPE,
        `auto` resolved as for serving)."""
        return serving_dtype(self.dtype, device)

    def width_multiple(self, device: torch.device | str = "cpu") -> int:
        """What a batch's sequence width is padded up to a multiple of (RLHF_PPO_PAD_MULTIPLE,
        `0` resolved for the compute dtype on `device`)."""
        if self.pad_multiple:
            return self.pad_multiple
        return width_multiple(self.compute_dtype(device))

    def make_kl_controller(self) -> algo.KLController:
        if self.adaptive_kl:
            return algo.AdaptiveKLController(
                self.init_kl_coef, self.target_kl, self.kl_horizon, self.min_kl_coef
            )
        return algo.FixedKLController(self.init_kl_coef)
