"""Reward losses and metrics, pinned by values computed by hand."""

import math
import statistics

import pytest
import torch

from rlhf.algorithms.reward import (
    MIN_SCALE,
    binary_feedback_loss,
    bradley_terry_loss,
    brier_score,
    expected_calibration_error,
    normalisation,
    normalise,
    pairwise_accuracy,
    placements,
    ranking_difference,
    roc_auc,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# -- Bradley-Terry ----------------------------------------------------------------------------


def test_bradley_terry_is_the_mean_negative_log_likelihood():
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(-1) = log(1 + e) = 1.313262
    loss = bradley_terry_loss(t(2.0, 0.0), t(0.0, 1.0))
    assert loss.item() == pytest.approx((0.126928 + 1.313262) / 2, abs=1e-6)


def test_bradley_terry_weights_each_pair():
    loss = bradley_terry_loss(t(2.0, 0.0), t(0.0, 1.0), weights=t(1.0, 3.0))
    assert loss.item() == pytest.approx((0.126928 + 3 * 1.313262) / 4, abs=1e-6)


def test_bradley_terry_depends_only_on_the_difference():
    assert bradley_terry_loss(t(5.0), t(4.0)).item() == pytest.approx(
        bradley_terry_loss(t(-3.0), t(-4.0)).item()
    )


def test_bradley_terry_gradient_pushes_the_pair_apart():
    chosen = t(0.0).requires_grad_()
    rejected = t(0.0).requires_grad_()
    bradley_terry_loss(chosen, rejected).backward()
    # d/d chosen of -log sigmoid(c - r) = -(1 - sigmoid(0)) = -0.5, and +0.5 for rejected.
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert rejected.grad.item() == pytest.approx(0.5)


def test_a_confidently_wrong_pair_costs_a_large_finite_loss():
    assert bradley_terry_loss(t(-100.0), t(100.0)).item() == pytest.approx(200.0, rel=1e-5)


def test_bradley_terry_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))


# -- unpaired (thumbs) ------------------------------------------------------------------------


def test_binary_loss_is_logistic_regression():
    # up at score 0: -log sigmoid(0) = ln 2; down at score ln 3: -log sigmoid(-ln 3) = ln 4
    loss = binary_feedback_loss(t(0.0, math.log(3)), t(1.0, 0.0))
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)


def test_desirable_weight_counts_thumbs_up_more():
    loss = binary_feedback_loss(t(0.0, math.log(3)), t(1.0, 0.0), desirable_weight=2.0)
    assert loss.item() == pytest.approx((2 * math.log(2) + math.log(4)) / 3, abs=1e-6)


def test_a_soft_label_is_a_scalar_score():
    # target 0.25 at score 0: 0.25 * ln 2 + 0.75 * ln 2 = ln 2
    assert binary_feedback_loss(t(0.0), t(0.25)).item() == pytest.approx(math.log(2))


def _optimum(targets, **weights) -> float:
    """The single score minimising the loss over `targets` (gradient descent, convex)."""
    score = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([score], lr=2.0)
    for _ in range(500):
        optimizer.zero_grad()
        loss = binary_feedback_loss(score.expand(len(targets)), t(*targets), **weights)
        loss.backward()
        optimizer.step()
    return score.item()


def test_unweighted_optimum_is_calibrated():
    # 3 ups, 1 down for the same answer: the best score is logit(0.75) = ln 3.
    assert _optimum([1, 1, 1, 0]) == pytest.approx(math.log(3), abs=1e-3)


def test_weighting_moves_the_optimum_by_the_log_weight_ratio():
    # Documented price of rebalancing: the optimum moves by log(w_d / w_u) = log 2.
    moved = _optimum([1, 1, 1, 0], desirable_weight=2.0)
    assert moved == pytest.approx(math.log(3) + math.log(2), abs=1e-3)


def test_binary_loss_refuses_bad_weights():
    with pytest.raises(ValueError):
        binary_feedback_loss(t(0.0), t(1.0), undesirable_weight=0.0)


# -- metrics ----------------------------------------------------------------------------------


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(t(3.0, 1.0, 2.0), t(1.0, 1.0, 5.0)) == pytest.approx(0.5)


def test_pairwise_accuracy_without_pairs_is_nan():
    assert math.isnan(pairwise_accuracy(t(), t()))


def test_auc_of_the_textbook_example():
    # positives 0.35, 0.8; negatives 0.1, 0.4: 3 of 4 positive-negative pairs ordered right.
    assert roc_auc(t(0.1, 0.4, 0.35, 0.8), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)


def test_auc_counts_tied_scores_half():
    # positive 1.0 ties the negative (0.5), positive 2.0 beats it (1): 1.5 / 2
    assert roc_auc(t(1.0, 1.0, 2.0), torch.tensor([0, 1, 1])) == pytest.approx(0.75)


def test_auc_is_invariant_to_monotone_transforms():
    scores = t(-2.0, 0.5, 0.1, 3.0, 1.0)
    labels = torch.tensor([0, 1, 0, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx(roc_auc(torch.sigmoid(scores), labels))


def test_auc_needs_both_classes():
    assert math.isnan(roc_auc(t(0.1, 0.2), torch.tensor([1, 1])))


def test_brier_score():
    assert brier_score(t(0.9, 0.2), t(1.0, 0.0)) == pytest.approx((0.01 + 0.04) / 2)


def test_expected_calibration_error_by_hand():
    # bins: [0,.1): p .05 vs 0 -> .05; [.1,.2): p .15 vs 1 -> .85; [.9,1]: p .935 vs 1 -> .065 x2
    ece = expected_calibration_error(t(0.05, 0.15, 0.95, 0.92), t(0.0, 1.0, 1.0, 1.0))
    assert ece == pytest.approx((0.05 + 0.85 + 2 * 0.065) / 4, abs=1e-6)


def test_a_probability_of_one_falls_in_the_last_bin():
    assert expected_calibration_error(t(1.0), t(1.0)) == pytest.approx(0.0)


def test_perfect_calibration_has_zero_ece():
    # In each bin, the mean prediction equals the share of positives.
    probs = t(0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75)
    targets = t(1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0)
    assert expected_calibration_error(probs, targets) == pytest.approx(0.0, abs=1e-9)


# -- normalisation ----------------------------------------------------------------------------


def test_normalisation_maps_reference_scores_to_mean_zero_std_one():
    scores = t(1.0, 2.0, 3.0, 4.0)
    shift, scale = normalisation(scores)
    assert shift == pytest.approx(2.5)
    assert scale == pytest.approx(math.sqrt(1.25))  # population std
    normalised = normalise(scores, shift, scale)
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert normalised.std(correction=0).item() == pytest.approx(1.0, abs=1e-6)


def test_constant_scores_get_the_minimum_scale():
    assert normalisation(t(2.0, 2.0, 2.0)) == (pytest.approx(2.0), MIN_SCALE)


def test_normalisation_needs_scores():
    with pytest.raises(ValueError):
        normalisation(t())


# -- the gate's ranking comparisons -----------------------------------------------------------

EMPTY = torch.zeros(0)


def test_the_student_quantile_matches_the_table():
    # t quantiles (two-sided 80% / one-sided 90%, and one-sided 95%) from standard tables.
    from rlhf.algorithms.reward import _student_quantile

    for p, dof, table in [(0.9, 4, 1.533), (0.9, 9, 1.383), (0.9, 30, 1.310), (0.95, 9, 1.833)]:
        assert _student_quantile(p, dof) == pytest.approx(table, rel=0.01)


def test_placements_by_hand():
    # Thumbs-up 0.9 and 0.4; thumbs-down 0.5, 0.1, 0.3 (and 0.4, tied, in the second case).
    scores = torch.tensor([0.9, 0.5, 0.4, 0.1, 0.3])
    liked = torch.tensor([True, False, True, False, False])
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    placed = placements(chosen, rejected, scores, liked)
    assert placed.pairs.tolist() == [1.0, 0.0, 0.5] and len(placed) == 8
    assert placed.liked.tolist() == pytest.approx([1.0, 2 / 3])
    assert placed.disliked.tolist() == pytest.approx([0.5, 1.0, 1.0])
    tied = placements(EMPTY, EMPTY, torch.tensor([0.9, 0.4, 0.4]), torch.tensor([1, 1, 0]))
    assert tied.liked.tolist() == [1.0, 0.5] and tied.disliked.tolist() == [0.75]
    # One kind of thumb only: nothing to order against.
    alone = placements(EMPTY, EMPTY, torch.tensor([0.9, 0.1]), torch.tensor([True, True]))
    assert alone.liked.tolist() == [0.5, 0.5] and alone.disliked.numel() == 0


def test_placements_average_to_the_auc_and_the_pairwise_accuracy():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(50, generator=generator).round(decimals=1)  # with ties
    liked = torch.rand(50, generator=generator) < 0.3
    chosen, rejected = torch.randn(2, 20, generator=generator).round(decimals=1)
    placed = placements(chosen, rejected, scores, liked)
    auc = roc_auc(scores, liked)
    assert placed.liked.mean().item() == pytest.approx(auc)
    assert placed.disliked.mean().item() == pytest.approx(auc)
    assert placed.pairs.mean().item() == pytest.approx(pairwise_accuracy(chosen, rejected))
    # Each thumbs-up's placement, counted pair by pair.
    down = scores[~liked]
    for score, value in zip(scores[liked], placed.liked, strict=True):
        wins = ((score > down).double() + 0.5 * (score == down).double()).mean()
        assert value.item() == pytest.approx(wins.item())


def test_ranking_against_chance_by_hand():
    # The thumbs above: AUC 5/6. DeLong's variance: var(1, 2/3) / 2 + var(0.5, 1, 1) / 3
    # = (1/18) / 2 + (1/12) / 3 = 1/18; Welch-Satterthwaite degrees of freedom
    # (1/18)^2 / ((1/36)^2 / 1 + (1/36)^2 / 2) = 8/3.
    from rlhf.algorithms.reward import _student_quantile

    scores = torch.tensor([0.9, 0.5, 0.4, 0.1, 0.3])
    liked = torch.tensor([True, False, True, False, False])
    vs_chance = ranking_difference(placements(EMPTY, EMPTY, scores, liked), None, 0.9)
    half = _student_quantile(0.9, 8 / 3) * math.sqrt(1 / 18)
    assert vs_chance.mean == pytest.approx(5 / 6 - 0.5) and vs_chance.count == 5
    assert vs_chance.lower == pytest.approx(1 / 3 - half)
    assert vs_chance.upper == pytest.approx(1 / 3 + half)


def test_pairs_and_thumbs_weigh_by_their_examples():
    # Four pairs (3 right) and the five thumbs above (AUC 5/6): a score of
    # (4 * 0.75 + 5 * 5/6) / 9, a variance of (4/9)^2 var(pairs) / 4 + (5/9)^2 / 18.
    chosen, rejected = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])
    scores = torch.tensor([0.9, 0.5, 0.4, 0.1, 0.3])
    liked = torch.tensor([True, False, True, False, False])
    both = ranking_difference(placements(chosen, rejected, scores, liked), None, 0.9)
    assert both.mean + 0.5 == pytest.approx((4 * 0.75 + 5 * 5 / 6) / 9)
    variance = (4 / 9) ** 2 * statistics.variance([1, 1, 1, 0]) / 4 + (5 / 9) ** 2 / 18
    assert both.upper - both.mean == pytest.approx(both.mean - both.lower)
    half = both.upper - both.mean
    # The quantile lies between the normal one and t at the smallest part's dof.
    z = statistics.NormalDist().inv_cdf(0.9)
    assert z * math.sqrt(variance) < half < 3.08 * math.sqrt(variance)


def test_a_paired_ranking_comparison_cancels_what_both_models_share():
    scores = torch.tensor([0.9, 0.5, 0.4, 0.1, 0.3])
    liked = torch.tensor([True, False, True, False, False])
    a = placements(EMPTY, EMPTY, scores, liked)
    same = ranking_difference(a, a, 0.9)
    assert (same.mean, same.lower, same.upper) == (0.0, 0.0, 0.0)
    # b moves a thumbs-up (0.4 -> 0.2) below one more thumbs-down: a's AUC is higher by 1/6,
    # which one example on each side shows, so the bounds stay wide.
    moved = torch.tensor([0.9, 0.5, 0.2, 0.1, 0.3])
    diff = ranking_difference(a, placements(EMPTY, EMPTY, moved, liked), 0.9)
    assert diff.mean == pytest.approx(roc_auc(scores, liked) - roc_auc(moved, liked))
    assert diff.mean == pytest.approx(1 / 6)
    assert diff.lower < 0 < diff.mean < diff.upper
    with pytest.raises(ValueError, match="same examples"):
        ranking_difference(a, placements(EMPTY, EMPTY, scores[:4], liked[:4]), 0.9)
    with pytest.raises(ValueError, match="confidence"):
        ranking_difference(a, None, 1.0)


def test_too_little_to_measure_gives_infinite_bounds():
    one_each = placements(EMPTY, EMPTY, torch.tensor([1.0, 0.0]), torch.tensor([True, False]))
    bounds = ranking_difference(one_each, None, 0.9)
    assert bounds.mean == pytest.approx(0.5) and bounds.lower == -math.inf
    nothing = ranking_difference(placements(EMPTY, EMPTY, EMPTY, EMPTY.bool()), None, 0.9)
    assert math.isnan(nothing.mean) and nothing.upper == math.inf and nothing.count == 0
