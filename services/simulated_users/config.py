"""Simulated users configuration."""

from dataclasses import dataclass

from rlhf.config import (
    ConfigError,
    GenerationAddressSettings,
    SeedSettings,
    TlsSettings,
    setting,
)


@dataclass(frozen=True)
class SimulatedUsersConfig(SeedSettings, GenerationAddressSettings, TlsSettings):
    feedback_address: str = setting(
        "RLHF_FEEDBACK_ADDRESS", "127.0.0.1:50052", "host:port of the feedback service"
    )
    api_key: str = setting(
        "RLHF_SIM_API_KEY",
        "",
        "API key (app role) the simulated users present to generation and feedback",
        True,
    )
    users: int = setting("RLHF_SIM_USERS", 2, "concurrent simulated users")
    pause_seconds: float = setting("RLHF_SIM_PAUSE_SECONDS", 0.5, "think time between requests")
    max_new_tokens: int = setting("RLHF_SIM_MAX_NEW_TOKENS", 32, "answer length users ask for")
    rank_share: float = setting(
        "RLHF_SIM_RANK_SHARE",
        0.25,
        "share of questions a user asks twice, then ranks the two answers (0 = thumbs only)",
    )
    threshold: float = setting(
        "RLHF_SIM_POSITIVE_THRESHOLD",
        0.3,
        "VADER compound score above which users give a thumbs-up",
    )
    require_topic: bool = setting(
        "RLHF_SIM_REQUIRE_TOPIC",
        True,
        "users give a thumbs-down to an answer that mentions nothing of what they asked about "
        "(no word of the question's topic), however cheerful (false: sentiment and repetition "
        "only)",
    )

    def validate(self) -> None:
        if self.users < 1 or self.max_new_tokens < 1 or self.pause_seconds < 0:
            raise ConfigError(
                "RLHF_SIM_USERS and RLHF_SIM_MAX_NEW_TOKENS must be >= 1, the pause >= 0"
            )
        if not 0.0 <= self.rank_share <= 1.0:
            raise ConfigError("RLHF_SIM_RANK_SHARE must be in [0, 1]")
