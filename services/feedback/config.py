"""Feedback service configuration."""

from dataclasses import dataclass

from rlhf.config import CommonConfig, ConfigError, setting


@dataclass(frozen=True)
class FeedbackConfig(CommonConfig):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50052, "gRPC port (0 = any)")
    generation_id_key: str = setting(
        "RLHF_GENERATION_ID_KEY", "", "HMAC key the generation service signs ids with", secret=True
    )
    generation_id_max_age_seconds: float = setting(
        "RLHF_GENERATION_ID_MAX_AGE_SECONDS", 7 * 24 * 3600.0, "feedback older than this is refused"
    )
    api_keys: tuple[str, ...] = setting(
        "RLHF_FEEDBACK_API_KEYS", (), "comma separated tenant=key pairs (keys 16+ chars)", True
    )
    max_text_chars: int = setting(
        "RLHF_FEEDBACK_MAX_TEXT_CHARS", 8192, "longest correction or comment accepted"
    )
    max_ranking_size: int = setting(
        "RLHF_FEEDBACK_MAX_RANKING_SIZE", 16, "most generations one ranking may order"
    )

    def validate(self) -> None:
        if len(self.generation_id_key.encode()) < 16:
            raise ConfigError("RLHF_GENERATION_ID_KEY must be set to at least 16 bytes")
        if not self.api_keys:
            raise ConfigError("RLHF_FEEDBACK_API_KEYS must name at least one tenant=key")
