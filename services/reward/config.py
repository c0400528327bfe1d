"""Reward service configuration."""

from dataclasses import dataclass

from rlhf.config import (
    CommonConfig,
    ConfigError,
    ConsumerSettings,
    RewardModelSettings,
    RewardTokenSettings,
    setting,
)
from rlhf.models import DTYPES


@dataclass(frozen=True)
class RewardConfig(CommonConfig, RewardModelSettings, RewardTokenSettings, ConsumerSettings):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50053, "gRPC port (0 = any)")
    max_batch: int = setting("RLHF_REWARD_MAX_BATCH", 64, "most pairs one Score call may carry")
    max_text_chars: int = setting(
        "RLHF_REWARD_MAX_TEXT_CHARS", 16384, "longest prompt or response accepted"
    )
    batch_max_pairs: int = setting(
        "RLHF_REWARD_BATCH_MAX_PAIRS",
        64,
        "most pairs coalesced into one forward pass (a larger single call is never split)",
    )
    batch_wait_ms: float = setting(
        "RLHF_REWARD_BATCH_WAIT_MS",
        2.0,
        "longest a batch waits for calls still being validated to share its forward pass",
    )
    max_queued_pairs: int = setting(
        "RLHF_REWARD_MAX_QUEUED_PAIRS",
        1024,
        "pairs waiting for a forward pass beyond which calls get RESOURCE_EXHAUSTED",
    )
    dtype: str = setting(
        "RLHF_REWARD_DTYPE",
        "auto",
        "weights the reward model scores with: float32, bfloat16, or auto (bfloat16 on a CPU "
        "with AMX or a CUDA GPU with bfloat16, else float32); scores are normalised in float32",
    )
    drift_sample: float = setting(
        "RLHF_REWARD_DRIFT_SAMPLE",
        0.1,
        "fraction of live generations scored for the drift metrics (0 = off)",
    )
    drift_group: str = setting(
        "RLHF_REWARD_DRIFT_GROUP", "rlhf-reward-drift", "consumer group of the drift sampler"
    )

    def validate(self) -> None:
        super().validate()
        if (
            min(self.max_batch, self.batch_max_pairs, self.max_queued_pairs, self.reward_max_tokens)
            < 1
        ):
            raise ConfigError("batch, queue and token limits must be positive")
        if self.batch_wait_ms < 0:
            raise ConfigError("RLHF_REWARD_BATCH_WAIT_MS must be >= 0")
        if self.dtype not in DTYPES:
            raise ConfigError(f"RLHF_REWARD_DTYPE={self.dtype!r}: use one of {DTYPES}")
        if not 0.0 <= self.drift_sample <= 1.0:
            raise ConfigError("RLHF_REWARD_DRIFT_SAMPLE must be in [0, 1]")
