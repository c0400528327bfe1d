"""Simulated users configuration."""

from dataclasses import dataclass

from rlhf.config import GenerationAddressSettings, SeedSettings, TlsSettings, setting


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
    threshold: float = setting(
        "RLHF_SIM_POSITIVE_THRESHOLD",
        0.3,
        "VADER compound score above which users give a thumbs-up",
    )
