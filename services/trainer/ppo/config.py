"""The ppo stage's settings: the stage's own, and the algorithm's, rollouts' and LoRA's knobs
declared beside the code that reads them (`rlhf.training`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import ConfigError, group, setting
from rlhf.training.online import LoraSettings, RolloutSettings
from rlhf.training.ppo_config import PPOConfig

ROLLOUTS = ("local", "pool")
PROMPT_ORDERS = ("newest", "oldest")
DIST_STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class PPOStageConfig:
    consumer_group: str = setting(
        "RLHF_TRAINER_GROUP", "rlhf-trainer", "ppo stage: Kafka consumer group"
    )
    reward_address: str = setting(
        "RLHF_REWARD_ADDRESS", "127.0.0.1:50053", "host:port of the reward service"
    )
    min_reward_version: int = setting(
        "RLHF_PPO_MIN_REWARD_VERSION",
        1,
        "PPO trains only on batches scored by a reward model of at least this version: it waits "
        "until the reward service serves one, and a batch scored by an older one is scored "
        "again, not trained on (0 = whatever is served, the untrained head included)",
    )
    batch_size: int = setting(
        "RLHF_PPO_BATCH_SIZE",
        8,
        "prompts with feedback per iteration (grpo and rloo sample RLHF_PPO_GROUP_SIZE answers "
        "for each)",
    )
    publish_every: int = setting(
        "RLHF_PUBLISH_EVERY_UPDATES", 1, "PPO updates between published policy checkpoints"
    )
    reference_version: int = setting(
        "RLHF_PPO_REFERENCE_VERSION",
        0,
        "policy version the KL penalty holds PPO to (0 = the base model; e.g. the sft result)",
    )
    follow_rollbacks: bool = setting(
        "RLHF_PPO_FOLLOW_ROLLBACKS",
        False,
        "ppo stage: when the release stage rolls a candidate back (or its canary expires), roll "
        "the ppo stage back to the incumbent that kept serving and train on from it (false: keep "
        "training the newest policy's line; the next candidate is gated against the incumbent "
        "afresh). Follows rollbacks decided while the stage runs",
    )
    max_staleness_seconds: float = setting(
        "RLHF_PPO_MAX_STALENESS_SECONDS",
        3600.0,
        "joined prompts older than this (since generation) are dropped, not trained on",
    )
    prompt_order: str = setting(
        "RLHF_PPO_PROMPT_ORDER",
        "newest",
        "which joined prompts a PPO batch takes first when more wait than it takes: newest "
        "(trains on current traffic; the rest wait until RLHF_PPO_MAX_STALENESS_SECONDS drops "
        "them) or oldest (every prompt in turn, however far behind the trainer falls)",
    )
    kl_alarm: float = setting(
        "RLHF_PPO_KL_ALARM", 50.0, "warn when the KL to the reference exceeds this (nats)"
    )
    rollouts: str = setting(
        "RLHF_PPO_ROLLOUTS",
        "local",
        "where PPO rollouts are sampled: local (in the trainer) or pool (on the generation "
        "service at RLHF_PPO_POOL_ADDRESS, importance-weighted in the update)",
    )
    pool_address: str = setting(
        "RLHF_PPO_POOL_ADDRESS",
        "127.0.0.1:50051",
        "host:port of the generation service that samples rollouts, with RLHF_PPO_ROLLOUTS=pool",
    )
    max_policy_lag: int = setting(
        "RLHF_PPO_MAX_POLICY_LAG",
        1,
        "pool rollouts: policy versions a rollout may lag the trainer's latest published one "
        "(older ones are sampled again)",
    )
    pool_wait_seconds: float = setting(
        "RLHF_PPO_POOL_WAIT_SECONDS",
        60.0,
        "pool rollouts: how long to ask again a pool still serving too old a policy before the "
        "batch is put back for later",
    )
    dist_backend: str = setting(
        "RLHF_DIST_BACKEND",
        "",
        "torch.distributed backend when the ppo stage runs under torchrun: gloo or nccl "
        "(empty: nccl with GPUs, gloo without); batch and minibatch must split over the ranks",
    )
    dist_strategy: str = setting(
        "RLHF_DIST_STRATEGY",
        "ddp",
        "how the ppo stage spreads training over torchrun's ranks: ddp (a whole copy per rank) "
        "or fsdp (weights, gradients and optimizer moments sharded, for a policy that does not "
        "fit one device; needs RLHF_PPO_ROLLOUTS=pool and no LoRA)",
    )
    algorithm: PPOConfig = group(PPOConfig, "ppo algorithm")
    rollout: RolloutSettings = group(RolloutSettings, "ppo rollouts")
    lora: LoraSettings = group(LoraSettings, "ppo LoRA")

    def validate(self) -> None:
        if self.min_reward_version < 0:
            raise ConfigError("RLHF_PPO_MIN_REWARD_VERSION must be >= 0")
        if self.batch_size < 1 or self.publish_every < 1:
            raise ConfigError("RLHF_PPO_BATCH_SIZE and RLHF_PUBLISH_EVERY_UPDATES must be positive")
        if self.max_staleness_seconds <= 0:
            raise ConfigError("RLHF_PPO_MAX_STALENESS_SECONDS must be > 0")
        if self.prompt_order not in PROMPT_ORDERS:
            raise ConfigError(
                f"RLHF_PPO_PROMPT_ORDER={self.prompt_order!r}: expected one of {PROMPT_ORDERS}"
            )
        if self.rollouts not in ROLLOUTS:
            raise ConfigError(f"RLHF_PPO_ROLLOUTS={self.rollouts!r}: expected one of {ROLLOUTS}")
        if self.rollouts == "pool" and not self.pool_address:
            raise ConfigError("RLHF_PPO_POOL_ADDRESS is required with RLHF_PPO_ROLLOUTS=pool")
        if self.max_policy_lag < 0 or self.pool_wait_seconds <= 0:
            raise ConfigError(
                "RLHF_PPO_MAX_POLICY_LAG must be >= 0 and RLHF_PPO_POOL_WAIT_SECONDS > 0"
            )
        if self.dist_backend not in ("", "gloo", "nccl"):
            raise ConfigError(f"RLHF_DIST_BACKEND={self.dist_backend!r}: expected gloo or nccl")
        self._validate_strategy()

    def _validate_strategy(self) -> None:
        """fsdp shards every decoder layer over the ranks, so each layer's forward is a
        collective (an all-gather) that every rank must enter the same number of times.
        Sampling in the trainer runs one forward per decoded token, and each rank's shard
        stops at its own longest response: the ranks would run different numbers of forwards
        and the one with more would wait for ever. Pool rollouts keep decoding off the
        trainer, and the update's forwards are one per minibatch on every rank alike. LoRA is
        refused: serving merges the adapter into whole weights, and an adapter's training
        state is small enough for ddp."""
        if self.dist_strategy not in DIST_STRATEGIES:
            raise ConfigError(
                f"RLHF_DIST_STRATEGY={self.dist_strategy!r}: expected one of {DIST_STRATEGIES}"
            )
        if self.dist_strategy == "fsdp" and self.rollouts != "pool":
            raise ConfigError(
                "RLHF_DIST_STRATEGY=fsdp needs RLHF_PPO_ROLLOUTS=pool: sampling in the trainer "
                "would run a different number of decode steps on each rank through the "
                "sharded layers, whose collectives would then never complete"
            )
        if self.dist_strategy == "fsdp" and self.lora.enabled:
            raise ConfigError(
                "RLHF_DIST_STRATEGY=fsdp does not support LoRA (RLHF_PPO_LORA_RANK > 0): "
                "use ddp, which an adapter's small training state fits"
            )
