"""Reward-model losses and metrics, as pure functions over tensors.

One scalar r(prompt, response) serves every kind of feedback, on one probability scale:

- a preference (a ranking, a pair, a correction beats the answer it corrects) follows the
  Bradley-Terry model, P(a preferred to b) = sigmoid(r_a - r_b);
- a thumb (unpaired) follows the logistic model, P(thumbs-up) = sigmoid(r).

The logistic term anchors the scalar: Bradley-Terry alone only fixes differences within a
prompt's answers, so a score of 1.0 could mean "good" for one prompt and "bad" for another; with
thumbs on the same scale, r > 0 means "more likely liked than not" whatever the prompt.
Evaluation reads the same two models: pairwise accuracy, AUC, and calibration (Brier, ECE). The
gate that decides whether a trained model may be served asks only how well it orders answers
(`placements`, `ranking_difference`): the reward service normalises scores and PPO learns from
their differences, so ranking is what a reward model is for; calibration is reported, not gated.
Serving then shifts and scales the scalar (`normalise`) so PPO sees a stable range.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Smallest scale `normalisation` returns: a model scoring every reference sample alike must not
# turn into a division by ~0 in the reward service.
MIN_SCALE = 1e-3


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged (weighted, if `weights` [N] is given).

    The negative log-likelihood of the observed preferences under Bradley-Terry. logsigmoid is
    used rather than log(sigmoid(.)) so a confidently wrong pair gives a large finite loss, not
    log(0).
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)}")
    return _weighted_mean(-F.logsigmoid(chosen - rejected), weights)


def binary_feedback_loss(
    scores: torch.Tensor,
    targets: torch.Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Logistic loss of unpaired feedback: targets in [0, 1] (1 = thumbs-up, 0 = thumbs-down, a
    scalar score as a soft label), P(desirable) = sigmoid(score).

    Per example: -(w_d * y * log sigmoid(r) + w_u * (1 - y) * log sigmoid(-r)), then divided by
    the total weight sum(w_d * y + w_u * (1 - y)). With both weights 1 this is plain logistic
    regression, whose sigmoid(r) is calibrated. Other weights (as in KTO's lambda_D, lambda_U)
    rebalance a skewed stream, e.g. 9 thumbs-up per thumbs-down, at a known price: the optimum
    moves by log(w_d / w_u), so sigmoid(r) is then calibrated to the reweighted stream.
    """
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)}")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError("desirable and undesirable weights must be > 0")
    targets = targets.to(scores.dtype)
    up = desirable_weight * targets
    down = undesirable_weight * (1.0 - targets)
    losses = -(up * F.logsigmoid(scores) + down * F.logsigmoid(-scores))
    return losses.sum() / (up + down).sum().clamp(min=1e-12)


# --------------------------------------------------------------------------------------------
# Metrics (no gradients; NaN when the data cannot define them)
# --------------------------------------------------------------------------------------------


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs the model orders like the user; a tie counts half (a coin flip)."""
    if chosen.numel() == 0:
        return math.nan
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return wins.mean().item()


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(a random positive scores above a random negative), ties half.

    Computed from ranks (Mann-Whitney U), with tied scores sharing their average rank. NaN unless
    both classes are present.
    """
    labels = labels.bool()
    positives = int(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = _average_ranks(scores.double())
    rank_sum = ranks[labels].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values`, tied values getting the mean of the ranks they span."""
    ordered, order = torch.sort(values)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = counts.cumsum(0)  # the highest rank in each run of equal values
    mean_rank = (last - (counts - 1) / 2).to(values.dtype)
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[group]
    return ranks


def brier_score(probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error of predicted probabilities against outcomes (lower is better)."""
    if probabilities.numel() == 0:
        return math.nan
    return ((probabilities.double() - targets.double()) ** 2).mean().item()


def expected_calibration_error(
    probabilities: torch.Tensor, targets: torch.Tensor, bins: int = 10
) -> float:
    """ECE: over `bins` equal-width probability bins, the gap |mean prediction - mean outcome|,
    weighted by the share of examples in the bin. Bins are [0, 0.1), ..., [0.9, 1.0]."""
    if probabilities.numel() == 0:
        return math.nan
    probabilities = probabilities.double()
    targets = targets.double()
    index = (probabilities * bins).long().clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = index == b
        count = int(in_bin.sum())
        if count:
            gap = probabilities[in_bin].mean() - targets[in_bin].mean()
            total += count * abs(gap.item())
    return total / probabilities.numel()


# --------------------------------------------------------------------------------------------
# The gate: does a candidate rank answers better than chance, or than another model, given how
# few examples judge it?
# --------------------------------------------------------------------------------------------


def _student_quantile(p: float, dof: float) -> float:
    """The Student t quantile, by the Cornish-Fisher expansion around the normal one (Abramowitz
    and Stegun 26.7.5; within 1% of the exact value for dof >= 4 at the levels used here):
    intervals on a few examples are wider than the normal approximation would make them."""
    z = statistics.NormalDist().inv_cdf(p)
    return (
        z
        + (z**3 + z) / (4 * dof)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3)
    )


@dataclass(frozen=True)
class Placements:
    """How well a model orders each held-out example against those it is compared with: 1 right,
    0 wrong, a tie half, chance 0.5 (the placement values of DeLong, DeLong and Clarke-Pearson
    1988, "Comparing the areas under two or more correlated ROC curves", Biometrics 44).

    - `pairs`: per pair, whether the chosen answer scores above the rejected one; their mean is
      `pairwise_accuracy`.
    - `liked`: per thumbs-up answer, the share of thumbs-down answers scored below it.
    - `disliked`: per thumbs-down answer, the share of thumbs-up answers scored above it.
      The means of `liked` and of `disliked` are both the thumbs' `roc_auc`.
    """

    pairs: torch.Tensor
    liked: torch.Tensor
    disliked: torch.Tensor

    def __len__(self) -> int:
        return self.pairs.numel() + self.liked.numel() + self.disliked.numel()

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pairs, liked, disliked) in float64."""
        return self.pairs.double(), self.liked.double(), self.disliked.double()


def placements(
    chosen: torch.Tensor, rejected: torch.Tensor, scores: torch.Tensor, liked: torch.Tensor
) -> Placements:
    """`Placements` of pairs scored (`chosen`, `rejected`) and of thumbs scored `scores`, where
    `liked` marks the thumbs-up. With only one kind of thumb there is nothing to order them
    against: every thumb places 0.5."""
    chosen, rejected, scores = chosen.double(), rejected.double(), scores.double()
    pairs = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    liked = liked.bool()
    up, down = int(liked.sum()), int((~liked).sum())
    if up == 0 or down == 0:
        half = torch.full_like(scores, 0.5)
        return Placements(pairs, half[liked], half[~liked])
    # An answer's midrank among all thumbs less its midrank within its own class counts the
    # other class's answers below it, ties half (the Mann-Whitney U, example by example).
    ranks = _average_ranks(scores)
    below_up = ranks[liked] - _average_ranks(scores[liked])
    below_down = ranks[~liked] - _average_ranks(scores[~liked])
    return Placements(pairs, below_up / down, 1.0 - below_down / up)


@dataclass(frozen=True)
class Paired:
    """The mean of a per-example difference and its one-sided confidence bounds."""

    mean: float
    lower: float  # the difference is above this with the given confidence
    upper: float  # ... and below this
    count: int


def ranking_difference(a: Placements, b: Placements | None, confidence: float) -> Paired:
    """How much better `a` ranks the held-out examples than `b` (None: chance, 0.5 everywhere),
    with one-sided bounds at `confidence`.

    The ranking score is the pairwise accuracy and the thumbs' AUC weighted by how many
    examples each rests on. Its variance adds the pairs' (their differences' sample variance
    over their count) and the AUC's by DeLong's method (S10 / m + S01 / n over the differences
    of the m thumbs-up and n thumbs-down placements), which are independent (different
    examples); `b` judging the same examples pairs the comparison, which cancels how hard each
    one is. The bounds use the t quantile at the Welch-Satterthwaite degrees of freedom, so a
    handful of examples on one side widens them. A part with fewer than two examples on a side
    is left out: its spread is unknown. With no part left the bounds are infinite.
    """
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    mine = a.parts()
    theirs = b.parts() if b is not None else (0.5, 0.5, 0.5)
    if b is not None and any(x.shape != y.shape for x, y in zip(mine, theirs, strict=True)):
        raise ValueError("a paired ranking comparison needs the same examples on both sides")
    pairs, liked, disliked = (x - y for x, y in zip(mine, theirs, strict=True))
    # (estimate, weight, variance terms as (variance of the mean, degrees of freedom))
    parts: list[tuple[float, int, list[tuple[float, int]]]] = []
    if pairs.numel() >= 2:
        k = pairs.numel()
        parts.append((pairs.mean().item(), k, [(pairs.var().item() / k, k - 1)]))
    m, n = liked.numel(), disliked.numel()
    if m >= 2 and n >= 2:
        terms = [(liked.var().item() / m, m - 1), (disliked.var().item() / n, n - 1)]
        parts.append((liked.mean().item(), m + n, terms))
    count = sum(weight for _, weight, _ in parts)
    if not count:
        every = torch.cat([pairs, liked, disliked])
        mean = every.mean().item() if every.numel() else math.nan
        return Paired(mean, -math.inf, math.inf, len(a))
    mean = sum(estimate * weight for estimate, weight, _ in parts) / count
    scaled = [
        ((weight / count) ** 2 * variance, dof)
        for _, weight, terms in parts
        for variance, dof in terms
    ]
    variance = sum(v for v, _ in scaled)
    if variance <= 0.0:
        return Paired(mean, mean, mean, len(a))
    dof = variance**2 / sum(v**2 / d for v, d in scaled)
    half = _student_quantile(confidence, max(dof, 1.0)) * math.sqrt(variance)
    return Paired(mean, mean - half, mean + half, len(a))


# --------------------------------------------------------------------------------------------
# Normalisation for serving
# --------------------------------------------------------------------------------------------


def normalisation(scores: torch.Tensor) -> tuple[float, float]:
    """(shift, scale) that map `scores` (raw, on reference-policy samples) to mean 0, std 1.

    The standard deviation is the population one (the samples are the reference distribution,
    not an estimate of a larger one), floored at MIN_SCALE.
    """
    if scores.numel() == 0:
        raise ValueError("normalisation needs at least one score")
    scores = scores.double()
    shift = scores.mean().item()
    scale = max(scores.std(correction=0).item(), MIN_SCALE)
    return shift, scale


def normalise(scores: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """(scores - shift) / scale."""
    return (scores - shift) / scale
