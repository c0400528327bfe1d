"""The offline release gate's comparison (rlhf.algorithms.release_gate) on hand-made numbers."""

import pytest

from rlhf.algorithms.release_gate import (
    GateMeasures,
    GateTolerance,
    compare,
    repeated_ngrams,
)

INCUMBENT = GateMeasures(reward=0.40, length=30.0, repetition=0.05, kl=1.0)
TOLERANCE = GateTolerance(reward=0.25, length=0.5, repetition=0.1, max_kl=0.0)


def _candidate(**changes):
    fields = {"reward": 0.40, "length": 30.0, "repetition": 0.05, "kl": 1.0, **changes}
    return GateMeasures(**fields)


def test_repeated_ngrams_counts_bigrams_seen_before():
    assert repeated_ngrams([1, 2, 3, 4, 5]) == 0.0
    assert repeated_ngrams([7, 7, 7, 7, 7]) == pytest.approx(3 / 4)  # (7,7) four times: 3 repeats
    assert repeated_ngrams([1, 2, 1, 2, 1]) == pytest.approx(2 / 4)  # (1,2),(2,1),(1,2),(2,1)
    assert repeated_ngrams([1, 2, 3, 1, 2, 3], n=3) == pytest.approx(1 / 4)
    assert repeated_ngrams([4]) == 0.0 and repeated_ngrams([]) == 0.0
    with pytest.raises(ValueError):
        repeated_ngrams([1, 2], n=0)


def test_a_candidate_like_the_incumbent_passes():
    verdict = compare(_candidate(), INCUMBENT, TOLERANCE)
    assert verdict.passed and verdict.reasons == ()


def test_within_every_tolerance_passes():
    candidate = _candidate(reward=0.16, length=44.0, repetition=0.14, kl=40.0)
    assert compare(candidate, INCUMBENT, TOLERANCE).passed


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        ({"reward": 0.14}, ("reward",)),  # 0.26 lower, tolerance 0.25
        ({"length": 46.0}, ("length",)),  # 53% longer
        ({"length": 14.0}, ("length",)),  # 53% shorter
        ({"repetition": 0.16}, ("repetition",)),  # 11 points more repeated bigrams
        ({"reward": -1.0, "repetition": 0.9}, ("reward", "repetition")),
    ],
)
def test_a_regression_beyond_tolerance_is_refused_and_named(changes, failed):
    verdict = compare(_candidate(**changes), INCUMBENT, TOLERANCE)
    assert not verdict.passed
    assert verdict.failed == failed  # each reason starts with its measure
    assert len(verdict.reasons) == len(failed)


def test_a_better_candidate_is_never_refused_for_being_better():
    candidate = _candidate(reward=3.0, repetition=0.0)
    assert compare(candidate, INCUMBENT, TOLERANCE).passed


def test_kl_is_capped_only_when_a_cap_is_set():
    far = _candidate(kl=12.0)
    assert compare(far, INCUMBENT, TOLERANCE).passed
    capped = compare(far, INCUMBENT, GateTolerance(max_kl=10.0))
    assert capped.failed == ("kl",)
    assert compare(_candidate(kl=9.0), INCUMBENT, GateTolerance(max_kl=10.0)).passed


def test_reward_is_not_compared_without_a_reward_model():
    unscored = GateMeasures(reward=None, length=30.0, repetition=0.05, kl=1.0)
    assert compare(unscored, INCUMBENT, TOLERANCE).passed
    assert compare(_candidate(reward=-5.0), unscored, TOLERANCE).passed


def test_tolerances_must_not_be_negative():
    with pytest.raises(ValueError, match="reward"):
        GateTolerance(reward=-0.1)
    with pytest.raises(ValueError, match="max_kl"):
        GateTolerance(max_kl=float("nan"))
