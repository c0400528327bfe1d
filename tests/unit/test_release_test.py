"""The release test (rlhf.algorithms.release): its error rates pinned on seeded simulated
thumbs, peeking after every thumb, its minimum sample and time limit, and the numbers it shows.

Each simulated run is a canary: every thumb goes to the candidate with probability `share`,
and is up with its arm's rate; the test is evaluated after every thumb (the worst case for a
test that is peeked at) and the run's outcome is its first decision within the horizon. Errors
are measured where they are largest, at the edge of each null hypothesis: a candidate worse by
exactly the margin (a promotion is false) and one exactly as good (a rollback is false).
Measured at the defaults (5% each): false promotions 1.5 to 3.3% (the most at a rate of 0.95),
false rollbacks 0.1 to 1.5%; about 4 s for the whole file.
"""

import math

import pytest
import torch

from rlhf.algorithms.release import (
    Decision,
    ReleaseTest,
    Thumbs,
    decide,
    decisions,
    half_width,
)

RUNS = 1000
STEPS = 4000  # thumbs per run, both arms together


def first_decisions(
    p_incumbent: float, p_candidate: float, share: float, test: ReleaseTest, seed: int
) -> dict[Decision, float]:
    """Share of RUNS whose first decision within STEPS thumbs is each Decision."""
    g = torch.Generator().manual_seed(seed)
    to_candidate = torch.rand(RUNS, STEPS, generator=g) < share
    rate = torch.where(to_candidate, p_candidate, p_incumbent)
    up = torch.rand(RUNS, STEPS, generator=g) < rate
    codes = decisions(
        (up & ~to_candidate).cumsum(1),
        (~to_candidate).cumsum(1),
        (up & to_candidate).cumsum(1),
        to_candidate.cumsum(1),
        test,
    )
    decided = codes != int(Decision.CONTINUE)
    first = decided.to(torch.int8).argmax(1)  # the first decided step, or 0 if none
    outcome = torch.where(decided.any(1), codes.gather(1, first[:, None])[:, 0], 0)
    return {d: (outcome == int(d)).double().mean().item() for d in Decision}


DEFAULT = ReleaseTest()
UNEVEN = ReleaseTest(promote_error=0.1, rollback_error=0.02, margin=0.05)


@pytest.mark.parametrize(
    ("test", "p_incumbent", "share", "seed"),
    [
        (DEFAULT, 0.6, 0.1, 1),
        (DEFAULT, 0.95, 0.1, 2),  # rates near 1: the plug-in variance's hardest case
        (DEFAULT, 0.3, 0.5, 3),
        (UNEVEN, 0.6, 0.1, 4),
    ],
)
def test_a_candidate_worse_by_the_margin_is_rarely_promoted(test, p_incumbent, share, seed):
    rates = first_decisions(p_incumbent, p_incumbent - test.margin, share, test, seed)
    assert rates[Decision.PROMOTE] <= test.promote_error
    assert rates[Decision.EXPIRED] == 0.0  # `decisions` knows no clock


@pytest.mark.parametrize(
    ("test", "p_incumbent", "share", "seed"),
    [
        (DEFAULT, 0.6, 0.1, 5),
        (DEFAULT, 0.95, 0.1, 6),
        (DEFAULT, 0.5, 0.5, 7),
        (UNEVEN, 0.6, 0.1, 8),
    ],
)
def test_a_candidate_as_good_is_rarely_rolled_back(test, p_incumbent, share, seed):
    rates = first_decisions(p_incumbent, p_incumbent, share, test, seed)
    assert rates[Decision.ROLLBACK] <= test.rollback_error


def test_clearly_better_is_promoted_and_clearly_worse_is_rolled_back():
    better = first_decisions(0.6, 0.7, 0.1, DEFAULT, 9)
    worse = first_decisions(0.6, 0.45, 0.1, DEFAULT, 10)
    assert better[Decision.PROMOTE] >= 0.95 and better[Decision.ROLLBACK] == 0.0
    assert worse[Decision.ROLLBACK] >= 0.95 and worse[Decision.PROMOTE] == 0.0


def test_the_minimum_sample_is_what_keeps_extreme_rates_honest():
    # The same worst case as above at a thumbs-up rate of 0.95, but deciding from 10 thumbs an
    # arm: the plug-in variance of a few thumbs near 1 is too small and promotions go past the
    # level. So `min_ratings` is load-bearing, not decoration.
    hasty = ReleaseTest(min_ratings=10)
    rates = first_decisions(0.95, 0.95 - hasty.margin, 0.1, hasty, 2)
    assert rates[Decision.PROMOTE] > hasty.promote_error


def test_no_decision_on_a_handful_of_ratings():
    test = ReleaseTest(min_ratings=100)
    # All ups against all downs: overwhelming, but each arm below the minimum.
    assert decide(Thumbs(99, 99), Thumbs(0, 99), 10.0, test).decision is Decision.CONTINUE
    assert decide(Thumbs(99, 99), Thumbs(0, 100), 10.0, test).decision is Decision.CONTINUE
    assert decide(Thumbs(100, 100), Thumbs(0, 100), 10.0, test).decision is Decision.ROLLBACK
    assert decide(Thumbs(0, 100), Thumbs(100, 100), 10.0, test).decision is Decision.PROMOTE
    nothing = decide(Thumbs(5, 10), Thumbs(0, 0), 10.0, test)
    assert nothing.decision is Decision.CONTINUE and nothing.evidence is None


def test_the_time_limit_expires_an_undecided_test_but_not_a_decided_one():
    test = ReleaseTest(max_seconds=3600.0)
    undecided = (Thumbs(60, 100), Thumbs(61, 100))
    assert decide(*undecided, 3599.0, test).decision is Decision.CONTINUE
    assert decide(*undecided, 3600.0, test).decision is Decision.EXPIRED
    assert decide(Thumbs(5, 10), Thumbs(0, 0), 3600.0, test).decision is Decision.EXPIRED
    decided = (Thumbs(900, 1000), Thumbs(400, 1000))
    assert decide(*decided, 1e9, test).decision is Decision.ROLLBACK


def test_the_evidence_is_the_estimate_and_the_mixture_boundary():
    test = ReleaseTest(promote_error=0.05, rollback_error=0.01, mixture_sd=0.1)
    verdict = decide(Thumbs(60, 100), Thumbs(50, 100), 0.0, test)
    p_i, p_c = 60.5 / 101, 50.5 / 101
    v = p_i * (1 - p_i) / 100 + p_c * (1 - p_c) / 100
    tau2 = 0.01

    def half(alpha: float) -> float:
        return math.sqrt(
            2 * v * (v + tau2) / tau2 * (math.log(1 / alpha) + 0.5 * math.log((v + tau2) / v))
        )

    assert verdict.evidence is not None
    assert verdict.evidence.difference == pytest.approx(-0.1)
    assert verdict.evidence.lower == pytest.approx(-0.1 - half(0.05))
    assert verdict.evidence.upper == pytest.approx(-0.1 + half(0.01))
    # Both ends are where the mixture likelihood ratio reaches exactly 1 / alpha.
    for theta0, alpha in ((verdict.evidence.lower, 0.05), (verdict.evidence.upper, 0.01)):
        log_ratio = 0.5 * math.log(v / (v + tau2)) + tau2 * (-0.1 - theta0) ** 2 / (
            2 * v * (v + tau2)
        )
        assert log_ratio == pytest.approx(math.log(1 / alpha))
    # The interval straddles both thresholds here, so the test goes on.
    assert verdict.decision is Decision.CONTINUE


def test_the_boundary_narrows_with_more_thumbs():
    widths = half_width(torch.tensor([0.01, 0.001, 0.0001], dtype=torch.float64), 0.05, 0.1)
    assert widths[0] > widths[1] > widths[2] > 0


def test_evidence_of_worse_wins_over_non_inferiority():
    # Many thumbs, candidate 1 point worse: shown worse (upper end < 0) and also within a
    # 2-point margin (lower end > -0.02). A rollback.
    verdict = decide(Thumbs(600_000, 1_000_000), Thumbs(590_000, 1_000_000), 0.0, DEFAULT)
    assert verdict.evidence is not None
    assert verdict.evidence.upper < 0 and verdict.evidence.lower > -DEFAULT.margin
    assert verdict.decision is Decision.ROLLBACK


@pytest.mark.parametrize(
    "kwargs",
    [
        {"promote_error": 0.0},
        {"rollback_error": 0.5},
        {"margin": -0.01},
        {"mixture_sd": 0.0},
        {"min_ratings": 1},
        {"max_seconds": 0.0},
    ],
)
def test_parameters_out_of_range_are_refused(kwargs):
    with pytest.raises(ValueError):
        ReleaseTest(**kwargs)


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError):
        Thumbs(up=3, total=2)
    with pytest.raises(ValueError):
        Thumbs(up=-1, total=2)
