"""Playground configuration."""

from dataclasses import dataclass

from rlhf.config import CommonConfig, ConfigError, GenerationAddressSettings, setting


@dataclass(frozen=True)
class PlaygroundConfig(CommonConfig, GenerationAddressSettings):
    grpc_port: int = setting("RLHF_GRPC_PORT", 50056, "gRPC port, health checks only (0 = any)")
    http_port: int = setting("RLHF_PLAYGROUND_PORT", 8082, "the page and its API (0 = any)")
    generation_url: str = setting(
        "RLHF_GENERATION_URL",
        "http://127.0.0.1:8080",
        "base URL of the generation service's HTTP API (OpenAI chat completions)",
    )
    feedback_url: str = setting(
        "RLHF_FEEDBACK_URL",
        "http://127.0.0.1:8081/v1/feedback",
        "the feedback service's HTTP JSON API",
    )
    trainer_address: str = setting(
        "RLHF_TRAINER_ADDRESS", "127.0.0.1:50054", "ppo trainer gRPC: step and phase (empty = none)"
    )
    reward_trainer_address: str = setting(
        "RLHF_REWARD_TRAINER_ADDRESS",
        "127.0.0.1:50055",
        "reward trainer gRPC: the reward model version (empty = none)",
    )
    feedback_metrics_url: str = setting(
        "RLHF_FEEDBACK_METRICS_URL",
        "http://127.0.0.1:9102/metrics",
        "the feedback service's /metrics: thumbs per policy version",
    )
    max_new_tokens: int = setting(
        "RLHF_PLAYGROUND_MAX_NEW_TOKENS", 96, "answer length the page asks for"
    )
    temperature: float = setting("RLHF_PLAYGROUND_TEMPERATURE", 0.8, "sampling temperature")
    session_hours: float = setting(
        "RLHF_PLAYGROUND_SESSION_HOURS", 12.0, "how long one sign-in lasts"
    )
    max_sessions: int = setting(
        "RLHF_PLAYGROUND_MAX_SESSIONS", 1000, "sign-ins held at once (the oldest is forgotten)"
    )
    max_connections: int = setting(
        "RLHF_PLAYGROUND_MAX_CONNECTIONS", 32, "HTTP connections served at once"
    )
    upstream_timeout_seconds: float = setting(
        "RLHF_PLAYGROUND_UPSTREAM_TIMEOUT_SECONDS",
        120.0,
        "longest wait for a byte from generation or feedback",
    )
    status_every_seconds: float = setting(
        "RLHF_PLAYGROUND_STATUS_EVERY_SECONDS", 3.0, "how often the panel's numbers are refreshed"
    )

    def validate(self) -> None:
        super().validate()
        for name in ("generation_url", "feedback_url", "feedback_metrics_url"):
            if not getattr(self, name).startswith(("http://", "https://")):
                raise ConfigError(f"{name} must be an http:// or https:// URL")
        for name in ("max_new_tokens", "max_sessions", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.session_hours <= 0 or self.status_every_seconds <= 0:
            raise ConfigError("session hours and the status interval must be > 0")
