"""`make up` configuration (`rlhf-up --help`)."""

from dataclasses import dataclass
from pathlib import Path

from rlhf.config import (
    ConfigError,
    GenerationIdSettings,
    PolicyModelSettings,
    RewardModelSettings,
    setting,
)
from rlhf.local import BROKER_PORT, PROMETHEUS_PORT

VIEWS = ("auto", "live", "plain")


@dataclass(frozen=True)
class LauncherConfig(PolicyModelSettings, RewardModelSettings, GenerationIdSettings):
    broker_port: int = setting(
        "RLHF_UP_BROKER_PORT", BROKER_PORT, "embedded broker port (a busy one: any free port)"
    )
    run_dir: Path = setting(
        "RLHF_UP_RUN_DIR", Path("run"), "logs, up.env and Prometheus data go here"
    )
    api_key: str = setting(
        "RLHF_UP_API_KEY",
        "",
        "API key of tenant 'local' for feedback and the generation HTTP API (empty = a new one)",
        True,
    )
    prometheus: bool = setting(
        "RLHF_UP_PROMETHEUS", True, "start `prometheus` with the alert rules if it is on PATH"
    )
    prometheus_port: int = setting(
        "RLHF_UP_PROMETHEUS_PORT", PROMETHEUS_PORT, "Prometheus web port (a busy one: any free)"
    )
    releases: bool = setting(
        "RLHF_UP_RELEASES",
        False,
        "run the release stage and serve releases (`make up RELEASES=1`): each new policy "
        "passes the offline gate, then serves a canary share until users' thumbs promote or "
        "roll it back (off: every new policy serves every user at once, as the loop learns "
        "fastest; docs/operations.md, 'Runbook: canary releases')",
    )
    view: str = setting(
        "RLHF_UP_VIEW", "auto", "live (refreshing panel), plain (log lines), auto: live on a TTY"
    )
    refresh_seconds: float = setting(
        "RLHF_UP_REFRESH_SECONDS", 2.0, "how often the live view refreshes"
    )
    status_every_seconds: float = setting(
        "RLHF_UP_STATUS_EVERY_SECONDS", 15.0, "how often the plain view prints a status line"
    )

    def validate(self) -> None:
        if self.view not in VIEWS:
            raise ConfigError(f"RLHF_UP_VIEW={self.view!r}: expected one of {VIEWS}")
        if self.refresh_seconds <= 0 or self.status_every_seconds <= 0:
            raise ConfigError(
                "RLHF_UP_REFRESH_SECONDS and RLHF_UP_STATUS_EVERY_SECONDS must be > 0"
            )
