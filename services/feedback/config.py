"""Feedback service configuration."""

from dataclasses import dataclass

from rlhf.auth import ApiKeys
from rlhf.config import CommonConfig, ConfigError, GenerationIdSettings, setting
from rlhf.limits import FeedbackLimits
from rlhf.server import tls_from_config


@dataclass(frozen=True)
class FeedbackConfig(CommonConfig, GenerationIdSettings, FeedbackLimits):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50052, "gRPC port (0 = any)")
    generation_id_max_age_seconds: float = setting(
        "RLHF_GENERATION_ID_MAX_AGE_SECONDS", 7 * 24 * 3600.0, "feedback older than this is refused"
    )
    api_keys: tuple[str, ...] = setting(
        "RLHF_FEEDBACK_API_KEYS", (), "comma separated tenant=key pairs (keys 16+ chars)", True
    )
    max_stream_items: int = setting(
        "RLHF_FEEDBACK_MAX_STREAM_ITEMS",
        10_000,
        "most items one StreamFeedback call may carry (the rest: RESOURCE_EXHAUSTED)",
    )
    stream_window: int = setting(
        "RLHF_FEEDBACK_STREAM_WINDOW",
        2_000,
        "events of one stream in flight to the broker before the handler waits for the oldest",
    )
    recent_keys: int = setting(
        "RLHF_FEEDBACK_RECENT_KEYS",
        100_000,
        "stored idempotency keys remembered to answer resends without publishing again",
    )
    linger_ms: int = setting(
        "RLHF_FEEDBACK_LINGER_MS", 2, "how long the producer waits to fill a batch"
    )
    http_port: int = setting(
        "RLHF_FEEDBACK_HTTP_PORT", -1, "HTTP JSON API port (0 = any, -1 = disabled)"
    )
    http_max_body_bytes: int = setting(
        "RLHF_FEEDBACK_HTTP_MAX_BODY_BYTES", 256 * 1024, "largest HTTP request body accepted"
    )
    http_max_connections: int = setting(
        "RLHF_FEEDBACK_HTTP_MAX_CONNECTIONS", 64, "HTTP connections served at once"
    )
    http_cors_origins: tuple[str, ...] = setting(
        "RLHF_FEEDBACK_HTTP_CORS_ORIGINS",
        (),
        "comma separated browser origins allowed to call the HTTP API (* = any)",
    )

    def validate(self) -> None:
        if len(self.generation_id_key.encode()) < 16:
            raise ConfigError("RLHF_GENERATION_ID_KEY must be set to at least 16 bytes")
        if not self.api_keys:
            raise ConfigError("RLHF_FEEDBACK_API_KEYS must name at least one tenant=key")
        try:
            ApiKeys.parse(self.api_keys)
        except ValueError as exc:
            raise ConfigError(f"RLHF_FEEDBACK_API_KEYS: {exc}") from exc
        for name in ("max_stream_items", "stream_window", "recent_keys", "http_max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        tls_from_config(self)  # fails at start-up, not at the first request
