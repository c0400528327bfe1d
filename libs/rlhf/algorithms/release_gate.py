"""Should a candidate policy get a canary at all? The offline gate, on a fixed prompt set.

Before any user is answered by a new policy, the release stage samples both it and the
incumbent on the same held-out prompts (same seeds) and measures, per policy:

- **reward**: the mean score of its answers under the served reward model (both policies scored
  by the same reward model version, so the difference is the policies', not the scorer's), and
  the standard deviation of those scores (`reward_sd`);
- **length**: the mean answer length in tokens;
- **repetition**: the mean share of repeated token bigrams in an answer (`repeated_ngrams`):
  0 for an answer that never repeats a bigram, near 1 for "no no no no ...";
- **kl**: the mean KL to the reference policy, per answer (k1: the sum over the answer of the
  policy's minus the reference's log-probability of each sampled token).

`compare` refuses a candidate that regresses beyond a tolerance on any of them: mean reward
lower than the incumbent's by more than `reward` standard deviations of the answers' rewards
(pooled over both policies: sqrt of the mean of the two variances), mean length off the
incumbent's by more than the relative `length` either way (babbling on, or collapsing to
nothing), repetition higher by more than `repetition`, or KL above `max_kl` (an absolute cap,
not a comparison: the KL of each newer PPO policy is expected to grow; 0 = no cap). Pure
functions on numbers; the measuring is `rlhf.training.release_gate`.

Why standard deviations, not reward-model units: a reward model's scale is arbitrary (a
Bradley-Terry or logistic head is unchanged in ranking by any positive rescaling) and changes
from one reward model version to the next, so a tolerance in its raw units would be strict under
one version and lax under the next. The spread of the answers' rewards under the version that
scored both sides moves with that scale: the drop it allows is the same effect size whatever the
version. It is also what the gate's prompt set can resolve: with n answers per policy the
difference of two means has a standard error of about sd * sqrt(2 / n) (0.25 sd for the
shipped 16 prompts x 2 answers), so the default 0.5 sd refuses a candidate exactly as good as
the incumbent about 2% of the time (two standard errors) and one that is worse by a whole
standard deviation almost always.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def repeated_ngrams(token_ids: Sequence[int], n: int = 2) -> float:
    """The share of an answer's n-grams that repeat an earlier n-gram of it (0 when it has
    fewer than two n-grams: nothing to repeat)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclass(frozen=True)
class GateMeasures:
    """One policy's means over the gate's prompt set."""

    reward: float | None  # None: no reward model served yet (reward is not compared)
    length: float  # tokens per answer
    repetition: float  # repeated token-bigram share per answer, in [0, 1)
    kl: float  # nats per answer, to the reference policy
    reward_sd: float = 0.0  # standard deviation of the answers' rewards (0: one answer, or none)


@dataclass(frozen=True)
class GateTolerance:
    """How far a candidate may regress against the incumbent before it is refused."""

    reward: float = 0.5  # mean reward lower by at most this many pooled standard deviations
    length: float = 0.5  # mean length within this fraction of the incumbent's, either way
    repetition: float = 0.1  # repeated-bigram share higher by at most this
    max_kl: float = 0.0  # KL to the reference at most this (0: no cap)

    def __post_init__(self) -> None:
        for name in ("reward", "length", "repetition", "max_kl"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"gate tolerance {name} must be >= 0, got {getattr(self, name)}")


def reward_spread(candidate: GateMeasures, incumbent: GateMeasures) -> float:
    """The pooled standard deviation of both policies' answers' rewards: the unit of the
    reward tolerance."""
    return math.sqrt((candidate.reward_sd**2 + incumbent.reward_sd**2) / 2.0)


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: tuple[str, ...]  # one per regression, empty when passed; each names its measure

    @property
    def failed(self) -> tuple[str, ...]:
        """The measures that regressed (reward, length, repetition, kl)."""
        return tuple(reason.split(":", 1)[0] for reason in self.reasons)


def compare(
    candidate: GateMeasures, incumbent: GateMeasures, tolerance: GateTolerance
) -> GateVerdict:
    """The gate's verdict on `candidate` against `incumbent` (see the module docstring)."""
    reasons = []
    if candidate.reward is not None and incumbent.reward is not None:
        sd = reward_spread(candidate, incumbent)
        drop = incumbent.reward - candidate.reward
        # Equal spreads of 0 (every answer scored alike): any drop at all is beyond tolerance.
        if drop > tolerance.reward * sd and drop > 0.0:
            lower = f"lower by {drop / sd:.2f} sd" if sd > 0.0 else "lower, every answer alike"
            reasons.append(
                f"reward: mean {candidate.reward:+.3f} against {incumbent.reward:+.3f}, {lower} "
                f"(sd {sd:.3f}; may be lower by {tolerance.reward:g} sd)"
            )
    low, high = (1 - tolerance.length) * incumbent.length, (1 + tolerance.length) * incumbent.length
    if not low <= candidate.length <= high:
        reasons.append(
            f"length: mean {candidate.length:.1f} tokens against {incumbent.length:.1f} "
            f"(within {tolerance.length:.0%} either way)"
        )
    if candidate.repetition > incumbent.repetition + tolerance.repetition:
        reasons.append(
            f"repetition: {candidate.repetition:.1%} repeated bigrams against "
            f"{incumbent.repetition:.1%} (may be higher by {tolerance.repetition:.0%})"
        )
    if tolerance.max_kl and candidate.kl > tolerance.max_kl:
        reasons.append(
            f"kl: {candidate.kl:.2f} nats to the reference (at most {tolerance.max_kl:g})"
        )
    return GateVerdict(not reasons, tuple(reasons))
