"""Trainer configuration."""

from dataclasses import dataclass

from rlhf.config import CommonConfig, ConfigError, setting


@dataclass(frozen=True)
class TrainerConfig(CommonConfig):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50054, "gRPC port of the control plane (0 = any)")
    stage: str = setting("RLHF_TRAINER_STAGE", "ppo", "training stage; this build runs: ppo")
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
    seed: int = setting("RLHF_SEED", 0, "seed for rollouts and minibatch shuffling")

    def validate(self) -> None:
        if self.stage != "ppo":
            raise ConfigError(f"RLHF_TRAINER_STAGE={self.stage!r}: this build runs the ppo stage")
        if self.batch_size < 1 or self.minibatch_size < 1 or self.publish_every < 1:
            raise ConfigError("batch sizes and RLHF_PUBLISH_EVERY_UPDATES must be positive")
