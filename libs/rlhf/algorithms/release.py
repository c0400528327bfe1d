"""Should a candidate policy replace the incumbent? A sequential test on users' thumbs.

A candidate serves a share of traffic beside the incumbent (a canary); each arm's thumbs are a
Bernoulli stream (up = 1). The test may be evaluated after every thumb, as often as anyone
likes, without inflating its error rates: it is a mixture sequential probability ratio test
(mSPRT), the "always valid" test of Johari, Koomen, Pekelis and Walsh 2017, "Peeking at A/B
Tests: Why it matters, and what to do about it" (KDD '17; sec. 4 for the normal mixture and
two-stream binary data, with the plug-in variance used here), after Robbins 1970, "Statistical
methods related to the law of the iterated logarithm" (the normal-mixture martingale).

Read top to bottom: the parameters (`ReleaseTest`), the statistic on counts (`Evidence`:
estimate, variance and the confidence sequence's half width), and the decision (`decide`, or
`decisions` for many at once: the same code, so the error-rate test in
tests/unit/test_release_test.py pins the function the controller runs).

The statistic. theta = p_candidate - p_incumbent, its estimate theta_hat the difference of the
two arms' thumbs-up rates, with variance v = p_c(1 - p_c)/n_c + p_i(1 - p_i)/n_i (each arm's
rate shrunk by half a thumb each way, (up + 0.5)/(n + 1), so an arm of all ups or all downs does
not claim zero variance). In information time 1/v, (theta_hat - theta)/v is a Brownian motion
whatever order the two arms' thumbs arrive in (Cov(theta_hat_s, theta_hat_t) = v_t for s before
t), so mixing its likelihood ratio over theta ~ N(theta0, tau^2) gives

    Lambda(theta0) = sqrt(v / (v + tau^2)) * exp(tau^2 (theta_hat - theta0)^2 / (2 v (v + tau^2)))

a non-negative martingale under theta = theta0 with mean 1, so by Ville's inequality it ever
reaches 1/alpha with probability at most alpha. Lambda(theta0) >= 1/alpha exactly when theta0 is
more than `half_width` from theta_hat, with

    half_width = sqrt(2 v (v + tau^2) / tau^2 * (log(1/alpha) + log((v + tau^2) / v) / 2))

so the set of theta0 not rejected is a confidence sequence, theta_hat -/+ half_width, valid at
every moment at once; the decisions read it:

- **roll back** when the candidate is worse: the upper end (at `rollback_error`) is below 0.
  Rejects H0: theta >= 0, so a candidate users like at least as much is rolled back with
  probability at most `rollback_error` (a false rollback).
- **promote** when the candidate is at least as good, up to `margin`: the lower end (at
  `promote_error`) is above -margin. Rejects H0: theta <= -margin, so a candidate worse by the
  margin or more is promoted with probability at most `promote_error` (a false promotion). The
  margin is what lets a candidate exactly as good as the incumbent be promoted in finite time.
- Both at once (a candidate shown worse, by less than the margin: only with many thumbs) is a
  roll back: evidence of worse wins.

Each decision reads one side of a two-sided boundary at its level, so it errs with at most that
level (about half of it in the Gaussian limit): conservative, the price of one simple boundary.
With a composite null the boundary case is the worst: for theta below -margin, crossing the
lower end above -margin only gets less likely (and likewise above 0 for a rollback).

Never on a handful of ratings: no decision before each arm has `min_ratings` thumbs (the plug-in
variance and the normal approximation need them; the error-rate test runs at this minimum).
A time limit ends the test: past `max_seconds` an undecided test is `EXPIRED`, and what to do
then (keep the incumbent: the candidate failed to show it is as good) is the controller's.

`tau` (`mixture_sd`) tunes which differences are found fastest: about the size of the effects
expected (Johari et al. sec. 4.3); 0.1 on a thumbs-up rate. The assumptions, stated: thumbs are
independent given the arm (a user's many thumbs are not; a sticky canary keeps a user on one
arm, which keeps the arms apart but makes thumbs of one user correlated), and the rates do not
drift during the test (both arms see the same drift at the same time, which is why the candidate
is compared with the incumbent serving now, not with the incumbent's past thumbs).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch


class Decision(enum.IntEnum):
    CONTINUE = 0  # not enough evidence yet (or fewer than `min_ratings` on an arm)
    PROMOTE = 1  # the candidate is at least as good as the incumbent, up to the margin
    ROLLBACK = 2  # the candidate is worse than the incumbent
    EXPIRED = 3  # the time limit passed with neither


@dataclass(frozen=True)
class ReleaseTest:
    """The test's parameters; see the module docstring for each one's role."""

    promote_error: float = 0.05  # P(promote | candidate worse by >= margin), at most
    rollback_error: float = 0.05  # P(roll back | candidate at least as good), at most
    margin: float = 0.02  # how much lower a promoted candidate's thumbs-up rate may be
    mixture_sd: float = 0.1  # tau: the spread of differences the test looks for
    min_ratings: int = 100  # thumbs on each arm before any decision
    max_seconds: float = 86_400.0  # undecided after this long: EXPIRED

    def __post_init__(self) -> None:
        for name in ("promote_error", "rollback_error"):
            level = getattr(self, name)
            if not 0.0 < level < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {level}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not self.mixture_sd > 0.0:
            raise ValueError(f"mixture_sd must be > 0, got {self.mixture_sd}")
        if self.min_ratings < 2:
            raise ValueError(f"min_ratings must be >= 2, got {self.min_ratings}")
        if not self.max_seconds > 0.0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")


@dataclass(frozen=True)
class Thumbs:
    """One arm's thumbs so far."""

    up: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.up <= self.total:
            raise ValueError(f"thumbs up {self.up} must be in [0, total {self.total}]")

    @property
    def rate(self) -> float | None:
        return self.up / self.total if self.total else None


@dataclass(frozen=True)
class Evidence:
    """Where the comparison stands: the estimated difference in thumbs-up rate (candidate minus
    incumbent) and the confidence sequence's ends, each at the level its decision uses."""

    difference: float
    lower: float  # at promote_error: promote once this is above -margin
    upper: float  # at rollback_error: roll back once this is below 0


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    evidence: Evidence | None  # None before both arms have a thumb


def half_width(variance: torch.Tensor, error: float, mixture_sd: float) -> torch.Tensor:
    """The mSPRT confidence sequence's half width at level `error` for an estimate of variance
    `variance` (elementwise; see the module docstring for the formula)."""
    tau2 = mixture_sd**2
    v = variance
    return torch.sqrt(
        2.0 * v * (v + tau2) / tau2 * (math.log(1.0 / error) + 0.5 * torch.log1p(tau2 / v))
    )


def _estimate(
    up_incumbent: torch.Tensor,
    n_incumbent: torch.Tensor,
    up_candidate: torch.Tensor,
    n_candidate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta_hat, v) elementwise; counts of 0 give NaN, masked out by the callers."""
    difference = up_candidate / n_candidate - up_incumbent / n_incumbent
    p_i = (up_incumbent + 0.5) / (n_incumbent + 1.0)
    p_c = (up_candidate + 0.5) / (n_candidate + 1.0)
    variance = p_i * (1.0 - p_i) / n_incumbent + p_c * (1.0 - p_c) / n_candidate
    return difference, variance


def decisions(
    up_incumbent: torch.Tensor,
    n_incumbent: torch.Tensor,
    up_candidate: torch.Tensor,
    n_candidate: torch.Tensor,
    test: ReleaseTest,
) -> torch.Tensor:
    """`Decision` codes (int64), elementwise over broadcastable count tensors, ignoring the time
    limit (`decide` applies it). The vectorised form of `decide`, which calls it."""
    counts = [t.to(torch.float64) for t in (up_incumbent, n_incumbent, up_candidate, n_candidate)]
    difference, variance = _estimate(*counts)
    upper = difference + half_width(variance, test.rollback_error, test.mixture_sd)
    lower = difference - half_width(variance, test.promote_error, test.mixture_sd)
    enough = (counts[1] >= test.min_ratings) & (counts[3] >= test.min_ratings)
    out = torch.full(difference.shape, int(Decision.CONTINUE), dtype=torch.int64)
    out = torch.where(enough & (lower > -test.margin), int(Decision.PROMOTE), out)
    return torch.where(enough & (upper < 0.0), int(Decision.ROLLBACK), out)


def decide(
    incumbent: Thumbs, candidate: Thumbs, elapsed_seconds: float, test: ReleaseTest
) -> Verdict:
    """The verdict on the thumbs so far, `elapsed_seconds` after the candidate got traffic.

    Evaluate it as often as wanted; act on the first verdict that is not CONTINUE (the
    guarantees are for the first crossing: a test that went on after a decision would be a new
    test). A decision reached by the evidence stands even past the time limit."""
    evidence = None
    if incumbent.total and candidate.total:
        counts = [
            torch.tensor(float(x), dtype=torch.float64)
            for x in (incumbent.up, incumbent.total, candidate.up, candidate.total)
        ]
        difference, variance = _estimate(*counts)
        evidence = Evidence(
            difference=difference.item(),
            lower=(difference - half_width(variance, test.promote_error, test.mixture_sd)).item(),
            upper=(difference + half_width(variance, test.rollback_error, test.mixture_sd)).item(),
        )
        decision = Decision(int(decisions(*counts, test)))
    else:
        decision = Decision.CONTINUE
    if decision is Decision.CONTINUE and elapsed_seconds >= test.max_seconds:
        decision = Decision.EXPIRED
    return Verdict(decision, evidence)
