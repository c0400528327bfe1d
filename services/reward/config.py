"""Reward service configuration."""

from dataclasses import dataclass

from rlhf.config import CommonConfig, setting


@dataclass(frozen=True)
class RewardConfig(CommonConfig):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50053, "gRPC port (0 = any)")
    reward_model: str = setting(
        "RLHF_REWARD_MODEL", "minilm-l6", "reward backbone: minilm-l6, or tiny-random for tests"
    )
    max_batch: int = setting("RLHF_REWARD_MAX_BATCH", 64, "most pairs one Score call may carry")
    max_text_chars: int = setting(
        "RLHF_REWARD_MAX_TEXT_CHARS", 16384, "longest prompt or response accepted"
    )
    max_tokens: int = setting(
        "RLHF_REWARD_MAX_TOKENS", 256, "pairs are truncated to this many tokens before scoring"
    )
