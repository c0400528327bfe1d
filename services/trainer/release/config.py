"""The release stage's settings: the offline gate's (`rlhf.algorithms.release_gate`), the
canary's share and the sequential test's parameters (`rlhf.algorithms.release.ReleaseTest`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.algorithms.release import ReleaseTest
from rlhf.algorithms.release_gate import GateTolerance
from rlhf.config import ConfigError, setting
from rlhf.models import DTYPES


@dataclass(frozen=True)
class ReleaseStageConfig:
    consumer_group: str = setting(
        "RLHF_RELEASE_TRAINER_GROUP", "rlhf-release", "release stage: Kafka consumer group"
    )
    gate: bool = setting(
        "RLHF_RELEASE_GATE",
        True,
        "release stage: before its canary, compare a new policy with the incumbent on a fixed "
        "prompt set (reward under the served reward model, length, repetition, KL to the "
        "reference); one that regresses beyond the tolerances gets no canary (false: every new "
        "policy gets one)",
    )
    gate_prompts: str = setting(
        "RLHF_RELEASE_GATE_PROMPTS",
        "",
        "release stage: file of the gate's prompts, one a line ('' = the shipped set, "
        "rlhf.training.release_gate.GATE_PROMPTS: topics the simulated users never ask about)",
    )
    gate_samples: int = setting(
        "RLHF_RELEASE_GATE_SAMPLES",
        2,
        "release stage: answers each policy gives per gate prompt (seeded alike for both)",
    )
    gate_max_new_tokens: int = setting(
        "RLHF_RELEASE_GATE_MAX_NEW_TOKENS", 32, "release stage: longest gate answer, in tokens"
    )
    gate_dtype: str = setting(
        "RLHF_RELEASE_GATE_DTYPE",
        "auto",
        "release stage: weights the gate samples both policies and runs the reference in: "
        "float32, bfloat16, or auto (bfloat16 on a CPU with AMX or a CUDA GPU with bfloat16, "
        "else float32); both policies alike, so the comparison is fair either way",
    )
    gate_reward_tolerance: float = setting(
        "RLHF_RELEASE_GATE_REWARD_TOLERANCE",
        0.5,
        "release stage: a candidate whose mean reward on the gate's prompts is lower than the "
        "incumbent's by more than this many standard deviations of the answers' rewards (pooled "
        "over both policies, so the same effect size under any reward model's scale) gets no "
        "canary; not compared while the reward service serves the untrained head (v0)",
    )
    gate_length_tolerance: float = setting(
        "RLHF_RELEASE_GATE_LENGTH_TOLERANCE",
        0.5,
        "release stage: a candidate whose mean answer length differs from the incumbent's by "
        "more than this fraction, either way, gets no canary",
    )
    gate_repetition_tolerance: float = setting(
        "RLHF_RELEASE_GATE_REPETITION_TOLERANCE",
        0.1,
        "release stage: a candidate whose answers' mean share of repeated token bigrams is "
        "higher than the incumbent's by more than this gets no canary",
    )
    gate_max_kl: float = setting(
        "RLHF_RELEASE_GATE_MAX_KL",
        0.0,
        "release stage: a candidate whose mean KL to the reference policy "
        "(RLHF_PPO_REFERENCE_VERSION) per gate answer exceeds this (nats) gets no canary "
        "(0 = no cap)",
    )
    min_ahead: int = setting(
        "RLHF_RELEASE_MIN_AHEAD",
        1,
        "release stage: a new policy is gated only once it is at least this many versions newer "
        "than the incumbent (1: every new policy; more: canaries of policies several updates "
        "apart, whose difference users can tell within a canary)",
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

    def tolerance(self) -> GateTolerance:
        return GateTolerance(
            reward=self.gate_reward_tolerance,
            length=self.gate_length_tolerance,
            repetition=self.gate_repetition_tolerance,
            max_kl=self.gate_max_kl,
        )

    def validate(self) -> None:
        if self.gate_dtype not in DTYPES:
            raise ConfigError(f"RLHF_RELEASE_GATE_DTYPE={self.gate_dtype!r}: use one of {DTYPES}")
        if not 0 < self.gate_samples <= 16 or not 0 < self.gate_max_new_tokens <= 512:
            raise ConfigError(
                "RLHF_RELEASE_GATE_SAMPLES must be in [1, 16] and "
                "RLHF_RELEASE_GATE_MAX_NEW_TOKENS in [1, 512]"
            )
        from rlhf.training.release_gate import load_prompts  # torch and transformers

        try:
            self.tolerance()
            load_prompts(self.gate_prompts)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"release gate: {exc}") from exc
        if self.min_ahead < 1:
            raise ConfigError("RLHF_RELEASE_MIN_AHEAD must be at least 1")
        if not 0.0 < self.canary_share <= 1.0:
            raise ConfigError("RLHF_CANARY_SHARE must be in (0, 1]")
        try:
            self.test()
        except ValueError as exc:
            raise ConfigError(f"release stage: {exc}") from exc
