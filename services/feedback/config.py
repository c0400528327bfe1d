"""Feedback service configuration."""

from dataclasses import dataclass

from rlhf.auth import APP, Credentials
from rlhf.config import CommonConfig, ConfigError, GenerationIdSettings, setting
from rlhf.limits import FeedbackLimits, RateLimiter
from rlhf.server import tls_from_config


@dataclass(frozen=True)
class FeedbackConfig(CommonConfig, GenerationIdSettings, FeedbackLimits):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50052, "gRPC port (0 = any)")
    generation_id_max_age_seconds: float = setting(
        "RLHF_GENERATION_ID_MAX_AGE_SECONDS", 7 * 24 * 3600.0, "feedback older than this is refused"
    )
    api_keys: tuple[str, ...] = setting(
        "RLHF_FEEDBACK_API_KEYS",
        (),
        "comma separated tenant=key pairs (keys 16+ chars; a tenant may have several: rotation)",
        True,
    )
    rate_per_tenant: float = setting(
        "RLHF_FEEDBACK_RATE_PER_TENANT",
        500.0,
        "submissions (stream items included) one tenant may make per second on one replica; "
        "beyond, RESOURCE_EXHAUSTED (0 = no limit)",
    )
    burst_per_tenant: int = setting(
        "RLHF_FEEDBACK_BURST_PER_TENANT",
        10_000,
        "submissions one tenant may make at once before its rate applies",
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
        super().validate()
        self.check_generation_id_keys()
        if not self.api_keys:
            raise ConfigError("RLHF_FEEDBACK_API_KEYS must name at least one tenant=key")
        try:
            self.apps()
        except ValueError as exc:
            raise ConfigError(f"RLHF_FEEDBACK_API_KEYS: {exc}") from exc
        if self.rate_per_tenant < 0 or self.burst_per_tenant < 1:
            raise ConfigError(
                "RLHF_FEEDBACK_RATE_PER_TENANT must be >= 0, RLHF_FEEDBACK_BURST_PER_TENANT >= 1"
            )
        for name in ("max_stream_items", "stream_window", "recent_keys", "http_max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        tls_from_config(self)  # fails at start-up, not at the first request

    def apps(self) -> Credentials:
        """The tenants' keys (app role)."""
        return Credentials.parse(APP, self.api_keys)

    def rate_limiter(self) -> RateLimiter | None:
        if self.rate_per_tenant == 0:
            return None
        return RateLimiter(self.rate_per_tenant, self.burst_per_tenant)
