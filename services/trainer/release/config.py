"""The release stage's settings: the canary's share and the sequential test's parameters
(`rlhf.algorithms.release.ReleaseTest`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.algorithms.release import ReleaseTest
from rlhf.config import ConfigError, setting


@dataclass(frozen=True)
class ReleaseStageConfig:
    consumer_group: str = setting(
        "RLHF_RELEASE_TRAINER_GROUP", "rlhf-release", "release stage: Kafka consumer group"
    )
    canary_share: float = setting(
        "RLHF_CANARY_SHARE",
        0.1,
        "release stage: share of user requests a candidate policy answers during its canary",
    )
    promote_error: float = setting(
        "RLHF_RELEASE_PROMOTE_ERROR",
        0.05,
        "release stage: at most this chance of promoting a candidate whose thumbs-up rate is "
        "lower than the incumbent's by the margin or more",
    )
    rollback_error: float = setting(
        "RLHF_RELEASE_ROLLBACK_ERROR",
        0.05,
        "release stage: at most this chance of rolling back a candidate users like at least as "
        "much as the incumbent",
    )
    margin: float = setting(
        "RLHF_RELEASE_MARGIN",
        0.02,
        "release stage: how much lower a promoted candidate's thumbs-up rate may be",
    )
    mixture_sd: float = setting(
        "RLHF_RELEASE_MIXTURE_SD",
        0.1,
        "release stage: spread of the differences in thumbs-up rate the test looks for (tau)",
    )
    min_thumbs: int = setting(
        "RLHF_RELEASE_MIN_THUMBS",
        100,
        "release stage: thumbs on each version before the test may decide",
    )
    max_seconds: float = setting(
        "RLHF_RELEASE_MAX_SECONDS",
        86400.0,
        "release stage: a canary still undecided after this long is rolled back (expired)",
    )

    def test(self) -> ReleaseTest:
        return ReleaseTest(
            promote_error=self.promote_error,
            rollback_error=self.rollback_error,
            margin=self.margin,
            mixture_sd=self.mixture_sd,
            min_ratings=self.min_thumbs,
            max_seconds=self.max_seconds,
        )

    def validate(self) -> None:
        if not 0.0 < self.canary_share <= 1.0:
            raise ConfigError("RLHF_CANARY_SHARE must be in (0, 1]")
        try:
            self.test()
        except ValueError as exc:
            raise ConfigError(f"release stage: {exc}") from exc
