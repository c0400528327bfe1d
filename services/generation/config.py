"""Generation service configuration."""

from dataclasses import dataclass

from rlhf.config import CommonConfig, ConfigError, setting


@dataclass(frozen=True)
class GenerationConfig(CommonConfig):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50051, "gRPC port (0 = any)")
    policy_model: str = setting(
        "RLHF_POLICY_MODEL", "smollm2-135m", "base policy: smollm2-135m, or tiny-random for tests"
    )
    generation_id_key: str = setting(
        "RLHF_GENERATION_ID_KEY", "", "HMAC key signing generation ids (16+ bytes)", secret=True
    )
    max_prompt_tokens: int = setting("RLHF_MAX_PROMPT_TOKENS", 1024, "longest prompt accepted")
    max_prompt_chars: int = setting(
        "RLHF_MAX_PROMPT_CHARS", 16384, "longest prompt text accepted, before tokenising"
    )
    max_new_tokens_limit: int = setting(
        "RLHF_MAX_NEW_TOKENS_LIMIT", 512, "largest max_new_tokens a request may ask for"
    )
    default_max_new_tokens: int = setting(
        "RLHF_DEFAULT_MAX_NEW_TOKENS", 64, "max_new_tokens when a request leaves it at 0"
    )
    max_concurrent_requests: int = setting(
        "RLHF_MAX_CONCURRENT_REQUESTS", 32, "requests in flight before RESOURCE_EXHAUSTED"
    )

    def validate(self) -> None:
        if len(self.generation_id_key.encode()) < 16:
            raise ConfigError("RLHF_GENERATION_ID_KEY must be set to at least 16 bytes")
