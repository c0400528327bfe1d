"""Trainer configuration."""

from dataclasses import dataclass
from pathlib import Path

from rlhf.config import CommonConfig, ConfigError, setting

STAGES = ("ppo", "reward", "sft")
ROLLOUTS = ("local", "pool")
DIST_STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainerConfig(CommonConfig):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50054, "gRPC port of the control plane (0 = any)")
    stage: str = setting(
        "RLHF_TRAINER_STAGE",
        "ppo",
        "training stage: ppo, reward (reward-model training) or sft (demonstrations)",
    )
    policy_model: str = setting(
        "RLHF_POLICY_MODEL", "smollm2-135m", "base policy: smollm2-135m, or tiny-random for tests"
    )
    reward_address: str = setting(
        "RLHF_REWARD_ADDRESS", "127.0.0.1:50053", "host:port of the reward service"
    )
    consumer_group: str = setting("RLHF_TRAINER_GROUP", "rlhf-trainer", "Kafka consumer group")
    max_poll_interval_ms: int = setting(
        "RLHF_KAFKA_MAX_POLL_INTERVAL_MS", 10000, "consumer group liveness bound (Kafka setting)"
    )
    batch_size: int = setting("RLHF_PPO_BATCH_SIZE", 8, "prompts per PPO rollout batch")
    minibatch_size: int = setting("RLHF_PPO_MINIBATCH_SIZE", 4, "sequences per gradient step")
    ppo_epochs: int = setting("RLHF_PPO_EPOCHS", 2, "passes over each rollout batch")
    learning_rate: float = setting("RLHF_PPO_LEARNING_RATE", 1e-5, "AdamW learning rate")
    temperature: float = setting(
        "RLHF_PPO_TEMPERATURE", 0.7, "rollout sampling temperature (logprobs use the same)"
    )
    init_kl_coef: float = setting("RLHF_PPO_INIT_KL_COEF", 0.05, "initial KL penalty coefficient")
    target_kl: float = setting("RLHF_PPO_TARGET_KL", 6.0, "adaptive KL controller target (nats)")
    response_tokens: int = setting("RLHF_PPO_RESPONSE_TOKENS", 48, "new tokens per rollout")
    publish_every: int = setting(
        "RLHF_PUBLISH_EVERY_UPDATES", 1, "PPO updates between published policy checkpoints"
    )
    keep_checkpoints: int = setting(
        "RLHF_KEEP_CHECKPOINTS", 5, "newest policy checkpoints kept in the store"
    )
    reference_version: int = setting(
        "RLHF_PPO_REFERENCE_VERSION",
        0,
        "policy version the KL penalty holds PPO to (0 = the base model; e.g. the sft result)",
    )
    lora_rank: int = setting(
        "RLHF_PPO_LORA_RANK", 0, "LoRA adapter rank for PPO (0 = train every weight)"
    )
    lora_alpha: float = setting("RLHF_PPO_LORA_ALPHA", 16.0, "LoRA scaling numerator")
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
    importance_cap: float = setting(
        "RLHF_PPO_IS_CAP",
        2.0,
        "pool rollouts: cap of each token's importance weight pi_trainer / pi_pool (>= 1)",
    )
    pool_wait_seconds: float = setting(
        "RLHF_PPO_POOL_WAIT_SECONDS",
        60.0,
        "pool rollouts: how long to ask again a pool still serving too old a policy before the "
        "batch is put back for later",
    )
    max_staleness_seconds: float = setting(
        "RLHF_PPO_MAX_STALENESS_SECONDS",
        3600.0,
        "joined prompts older than this (since generation) are dropped, not trained on",
    )
    kl_alarm: float = setting(
        "RLHF_PPO_KL_ALARM", 50.0, "warn when the KL to the reference exceeds this (nats)"
    )
    metrics_log: str = setting(
        "RLHF_TRAINER_METRICS_LOG",
        "",
        "JSONL file, one line per update ('' = <checkpoint dir>/logs/<stage>.jsonl, off = none)",
    )
    keep_states: int = setting(
        "RLHF_KEEP_TRAINER_STATES", 2, "newest trainer states (optimizer, join) kept in the store"
    )
    seed: int = setting("RLHF_SEED", 0, "seed for rollouts and minibatch shuffling")
    # Reward stage
    reward_model: str = setting(
        "RLHF_REWARD_MODEL", "minilm-l6", "reward stage: backbone, minilm-l6 or tiny-random"
    )
    reward_group: str = setting(
        "RLHF_REWARD_TRAINER_GROUP",
        "rlhf-reward-trainer",
        "reward stage: Kafka consumer group (not the ppo stage's: both read every event)",
    )
    reward_round_examples: int = setting(
        "RLHF_REWARD_ROUND_EXAMPLES", 64, "reward stage: new examples that start a training round"
    )
    reward_steps: int = setting(
        "RLHF_REWARD_STEPS_PER_ROUND", 80, "reward stage: gradient steps per round"
    )
    reward_batch_size: int = setting(
        "RLHF_REWARD_BATCH_SIZE", 16, "reward stage: examples per step (a pair counts once)"
    )
    reward_learning_rate: float = setting(
        "RLHF_REWARD_LEARNING_RATE", 2e-4, "reward stage: AdamW learning rate"
    )
    reward_trainable_layers: int = setting(
        "RLHF_REWARD_TRAINABLE_LAYERS",
        2,
        "reward stage: top encoder layers trained with the head (-1 = the whole model)",
    )
    reward_max_tokens: int = setting(
        "RLHF_REWARD_MAX_TOKENS", 256, "reward stage: pairs are truncated to this many tokens"
    )
    reward_heldout_fraction: float = setting(
        "RLHF_REWARD_HELDOUT_FRACTION", 0.2, "reward stage: share of generations held out"
    )
    reward_min_heldout: int = setting(
        "RLHF_REWARD_MIN_HELDOUT", 32, "reward stage: held-out examples needed before publishing"
    )
    reward_tolerance: float = setting(
        "RLHF_REWARD_TOLERANCE",
        0.01,
        "reward stage: how much worse than the served model a held-out metric may be",
    )
    reward_desirable_weight: float = setting(
        "RLHF_REWARD_DESIRABLE_WEIGHT",
        1.0,
        "reward stage: weight of thumbs-up (!= 1 rebalances thumbs but biases calibration)",
    )
    reward_undesirable_weight: float = setting(
        "RLHF_REWARD_UNDESIRABLE_WEIGHT", 1.0, "reward stage: weight of thumbs-down"
    )

    # SFT stage
    sft_data: str = setting(
        "RLHF_SFT_DATA",
        "",
        "sft stage: JSONL file of {prompt, response} demonstrations to train on",
    )
    sft_group: str = setting(
        "RLHF_SFT_TRAINER_GROUP", "rlhf-sft-trainer", "sft stage: Kafka consumer group"
    )
    sft_round_examples: int = setting(
        "RLHF_SFT_ROUND_EXAMPLES", 16, "sft stage: new corrections that start a training round"
    )
    sft_epochs: int = setting("RLHF_SFT_EPOCHS", 2, "sft stage: passes over each round's data")
    sft_learning_rate: float = setting(
        "RLHF_SFT_LEARNING_RATE", 2e-5, "sft stage: AdamW learning rate"
    )
    sft_max_tokens: int = setting(
        "RLHF_SFT_MAX_TOKENS", 512, "sft stage: longest prompt + answer trained on"
    )

    def metrics_log_path(self) -> Path | None:
        if self.metrics_log == "off":
            return None
        if self.metrics_log:
            return Path(self.metrics_log).expanduser()
        return self.checkpoint_dir / "logs" / f"{self.stage}.jsonl"

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
        if self.dist_strategy == "fsdp" and self.lora_rank > 0:
            raise ConfigError(
                "RLHF_DIST_STRATEGY=fsdp does not support LoRA (RLHF_PPO_LORA_RANK > 0): "
                "use ddp, which an adapter's small training state fits"
            )

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"RLHF_TRAINER_STAGE={self.stage!r}: expected one of {STAGES}")
        if self.batch_size < 1 or self.minibatch_size < 1 or self.publish_every < 1:
            raise ConfigError("batch sizes and RLHF_PUBLISH_EVERY_UPDATES must be positive")
        if self.lora_rank < 0 or self.keep_states < 1 or self.max_staleness_seconds <= 0:
            raise ConfigError(
                "RLHF_PPO_LORA_RANK must be >= 0, RLHF_KEEP_TRAINER_STATES >= 1 and "
                "RLHF_PPO_MAX_STALENESS_SECONDS > 0"
            )
        if self.rollouts not in ROLLOUTS:
            raise ConfigError(f"RLHF_PPO_ROLLOUTS={self.rollouts!r}: expected one of {ROLLOUTS}")
        if self.rollouts == "pool" and not self.pool_address:
            raise ConfigError("RLHF_PPO_POOL_ADDRESS is required with RLHF_PPO_ROLLOUTS=pool")
        if self.max_policy_lag < 0 or not self.importance_cap >= 1 or self.pool_wait_seconds <= 0:
            raise ConfigError(
                "RLHF_PPO_MAX_POLICY_LAG must be >= 0, RLHF_PPO_IS_CAP >= 1 and "
                "RLHF_PPO_POOL_WAIT_SECONDS > 0"
            )
        if self.dist_backend not in ("", "gloo", "nccl"):
            raise ConfigError(f"RLHF_DIST_BACKEND={self.dist_backend!r}: expected gloo or nccl")
        self._validate_strategy()
        if min(self.sft_round_examples, self.sft_epochs, self.sft_max_tokens) < 1:
            raise ConfigError("sft stage round sizes must be positive")
        if min(self.reward_round_examples, self.reward_steps, self.reward_batch_size) < 1:
            raise ConfigError("reward stage round sizes must be positive")
        if not 0.0 < self.reward_heldout_fraction < 1.0:
            raise ConfigError("RLHF_REWARD_HELDOUT_FRACTION must be in (0, 1)")
        if min(self.reward_desirable_weight, self.reward_undesirable_weight) <= 0:
            raise ConfigError("reward stage thumb weights must be positive")
