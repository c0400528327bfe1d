"""PPO for language models, as pure functions over tensors.

Read top to bottom: masked statistics, per-token log-probabilities, which response tokens are
real, the KL penalty and rewards, advantages (GAE), the two clipped losses, and the KL
coefficient controllers. Nothing here does I/O or touches a model; `rlhf.training.ppo` wires
these into one PPO update.

Shapes: B is the batch, R the response width. Every [B, R] tensor comes with a bool `mask` of
the real response tokens; masked positions never contribute to a statistic, a reward or a loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Protocol

import torch

KLEstimator = Literal["k1", "k3"]
# How a per-token loss is averaged over a minibatch (see `aggregate`).
LossAggregation = Literal["token", "sequence"]

# Added to variances before the square root so that whitening a constant stays finite.
_WHITEN_EPS = 1e-8

# Sums a tensor over every data-parallel rank (identity in a single process).
AllSum = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is true (over everything, or along `dim`).

    Masked entries are selected away rather than multiplied by 0, so an inf or NaN computed at
    a padding position cannot leak in (inf * 0 is NaN). An empty selection gives 0 rather than
    NaN: a minibatch with no real tokens must not poison the loss or the logged statistics.
    """
    mask = mask.bool()
    selected = torch.where(mask, x, torch.zeros_like(x))
    count = mask.to(x.dtype)
    if dim is None:
        return selected.sum() / count.sum().clamp(min=1.0)
    return selected.sum(dim) / count.sum(dim).clamp(min=1.0)


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: LossAggregation) -> torch.Tensor:
    """A per-token loss [B, R] averaged over the masked positions, one of two ways.

    - "token": the mean over every real token of the batch, each token weighing the same
      (DAPO, Yu et al. 2025, sec. 3.3; what PPO here has always done).
    - "sequence": each row's mean over its real tokens, then the mean over the rows that have
      any (the GRPO paper's 1/|o_i| normalisation; Shao et al. 2024, eq. 3). A token of a short
      answer then weighs more than one of a long answer (Liu et al. 2025, Dr. GRPO, sec. 3.1).

    `rlhf.algorithms.group` says why "token" is the default.
    """
    if how == "token":
        return masked_mean(x, mask)
    if how == "sequence":
        has_tokens = mask.bool().any(dim=-1)
        return masked_mean(masked_mean(x, mask, dim=-1), has_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}; expected 'token' or 'sequence'")


def masked_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    all_sum: AllSum | None = None,
) -> torch.Tensor:
    """Variance of `x` over the masked positions.

    With `unbiased`, Bessel's correction n / (n - 1) is applied; with fewer than two real
    positions the variance is 0 (there is nothing to spread), instead of dividing by zero.
    `all_sum` (data parallel) adds a tensor up over every rank, so the variance is that of
    all ranks' positions together, the one a single process with the whole batch computes.
    """
    return _masked_moments(x, mask, unbiased, all_sum)[1]


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    all_sum: AllSum | None = None,
) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean if `shift_mean`) over the masked positions
    (of every rank, with `all_sum`; see `masked_var`).

    Masked positions are set to 0 in the result so they cannot leak into a later sum.
    """
    mean, var = _masked_moments(x, mask, True, all_sum)
    whitened = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def _masked_moments(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool, all_sum: AllSum | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) over the masked positions, summed across ranks by `all_sum`: two
    rounds (the mean first), so each rank's squared deviations are from the global mean."""
    total = all_sum or (lambda t: t)
    mask = mask.bool()
    selected = torch.where(mask, x, torch.zeros_like(x))
    count_and_sum = total(torch.stack([mask.to(x.dtype).sum(), selected.sum()]))
    n = count_and_sum[0]
    mean = count_and_sum[1] / n.clamp(min=1.0)
    squares = total(torch.where(mask, (x - mean) ** 2, torch.zeros_like(x)).sum())
    var = squares / n.clamp(min=1.0)
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1.0), torch.zeros_like(var))
    return mean, var


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at `labels`: [B, R, V], [B, R] -> [B, R].

    The temperature must be the one the responses were sampled with: PPO's ratio compares the
    policy that produced the samples with the one being trained, and sampling at T means that
    policy is softmax(logits / T). A temperature of 0 (greedy) defines no distribution, and
    silently treating it as 1 would train against the wrong policy, so it is an error.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the sampling temperature), got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position: [..., V] -> [...].

    H = logsumexp(l) - sum(p * l), which avoids taking log(p) of tiny probabilities. Divide the
    logits by the sampling temperature first to get the entropy of the sampling distribution.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# --------------------------------------------------------------------------------------------
# Which response tokens are real
# --------------------------------------------------------------------------------------------


def response_mask(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Bool [B, R]: the tokens the policy really produced, up to and including the first EOS.

    Everything after the first EOS is padding from batched generation, and pad tokens are never
    real. When a tokenizer uses the EOS token as its pad token, the first EOS still counts as
    real: it is the token that ended the response, and the policy must learn to emit it.
    """
    is_eos = response_ids == eos_id
    # Number of EOS tokens strictly before each position: 0 means "not past the first EOS yet".
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    upto_first_eos = eos_before == 0
    first_eos = is_eos & upto_first_eos
    return upto_first_eos & ((response_ids != pad_id) | first_eos)


def ended(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Bool [B]: whether each response emitted an EOS (rather than running out of tokens)."""
    return (response_ids == eos_id).any(dim=-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Long [B]: the column of the last true entry of each row, -1 for an all-false row.

    The sequence-level score is credited there: the last real token, not the last column.
    """
    columns = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), columns, torch.full_like(columns, -1)).max(dim=-1).values


# --------------------------------------------------------------------------------------------
# KL penalty and rewards
# --------------------------------------------------------------------------------------------


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    Tokens are sampled from the policy, so with log r = ref - logp (Schulman's notes,
    "Approximating KL divergence"):
    - "k1" = logp - ref = -log r: unbiased, but a single token can be negative.
    - "k3" = (r - 1) - log r: also unbiased, and never negative because log r <= r - 1.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, R] and the per-token KL [B, R] they were penalised with.

    Every real token pays -kl_coef * KL for drifting from the reference; the scalar score of the
    whole response is added at its last real token, the action that completed it. Credit must
    not go to the last column: for a short response that column is padding, which the masks
    would then silently drop together with the score. A row with no real tokens gets nothing.
    """
    # Selected away, not multiplied by 0: k3 at a padding position can overflow to inf (its
    # expm1 does once the policy is ~89 nats less likely than the reference to emit a pad
    # there), and inf * 0 = NaN would spread through GAE and whitening to the whole batch.
    kl = torch.where(
        mask.bool(), kl_estimate(logprobs, ref_logprobs, estimator), torch.zeros_like(logprobs)
    )
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    has_tokens = last >= 0
    score_at_last = torch.zeros_like(rewards)
    score_at_last.scatter_(
        -1,
        last.clamp(min=0).unsqueeze(-1),
        (scores.to(rewards.dtype) * has_tokens.to(rewards.dtype)).unsqueeze(-1),
    )
    return rewards + score_at_last, kl


def apply_no_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores [B] where each response that never emitted EOS scores `score + penalty`.

    A truncated response is unfinished, but a reward model still scores the visible text and can
    score it well; without a penalty the policy learns to ramble until cut off. `penalty` is
    added, so pass a negative number (e.g. -1.0); responses that ended keep their score.
    """
    return torch.where(ended.bool(), scores, scores + penalty)


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response: (advantages [B, R], returns [B, R]).

    Runs backwards: delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam *
    A_{t+1}. The episode ends at the last real token, so the value and advantage of a masked
    next position count as 0 (no bootstrapping from padding), and masked positions get 0
    advantage and 0 return. Returns are A + V: the regression target of the value head.
    """
    mask_f = mask.to(values.dtype)
    # Selected away rather than multiplied by 0, so inf or NaN on padding cannot leak in.
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    width = values.shape[-1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(width)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Multiplying by the mask makes a masked position look like "after the episode" to t-1.
        next_advantage = (delta + gamma * lam * next_advantage) * mask_f[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask_f


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
    aggregation: LossAggregation = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss, averaged over real tokens (`aggregate`: every token alike,
    or per answer first), and its statistics.

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))). The max of the negated
    objectives is the pessimistic bound: once the ratio has moved past 1 +/- eps in the
    direction the advantage rewards, the clipped term is constant and its gradient is 0.
    Stats (detached): "clipfrac", the share of tokens where the clipped term was chosen;
    "approx_kl", 0.5 * mean((logp - old)^2) between the old and current policy; "ratio", the
    mean probability ratio.

    `weights` [B, R] (detached, e.g. `truncated_importance_weights`) multiply each token's
    clipped term before the mean, which stays over real tokens (not divided by the weights'
    sum): the decoupled objective of Hilton et al. 2021 when the samples came from another
    (behaviour) policy than `old_logprobs`'. Without weights the loss is plain PPO's.
    The statistics are token means whatever the aggregation.
    """
    # Zero the log-ratio on padding first: exp of a junk difference there could overflow, and
    # the backward pass of an inf is NaN even where the loss ignores it.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    surrogate = torch.maximum(unclipped, clipped)
    if weights is not None:
        surrogate = surrogate * weights
    loss = aggregate(surrogate, mask, aggregation)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((v - R)^2, (clip(v, old +/- c) - R)^2)), and clipfrac.

    Like the policy, the value head may only move `clip_range_value` away from its rollout-time
    prediction before the loss stops rewarding the move. clipfrac (detached) is the share of
    real tokens where the clipped error was the larger one.
    """
    clipped_values = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clipfrac


# --------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------


class KLController(Protocol):
    """What a trainer needs from a KL coefficient controller."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class FixedKLController:
    """A KL coefficient that never changes."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; present so trainers can treat both controllers alike."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences".

    A proportional controller steering the measured KL towards `target`: the error
    KL / target - 1 is clipped to [-0.2, 0.2] so one noisy batch cannot swing the coefficient,
    then coef *= 1 + error * n_steps / horizon, where n_steps is the number of samples the KL
    was measured on: over `horizon` samples a constant error moves the coefficient by ~e^error.

    `floor` (not in the paper; 0 leaves it out) bounds the coefficient from below, from the
    start (above `init_kl_coef` it starts there) and on resuming. While the policy is still
    close to the reference the error sits at -0.2 and the coefficient shrinks every update;
    online, the reward model then changes under the policy and the KL can rise faster than a
    shrunken coefficient can climb back (a make up run: the coefficient had decayed from 0.1 to
    0.05 over 40 updates at 2 nats when the KL went from 2 to 11 in 7 updates, and stayed above
    9 for the 30 updates after).
    """

    def __init__(
        self, init_kl_coef: float, target: float, horizon: int, floor: float = 0.0
    ) -> None:
        if target <= 0 or horizon <= 0 or floor < 0:
            raise ValueError(
                f"target and horizon must be > 0 and floor >= 0, got {target}, {horizon}, {floor}"
            )
        self.value = max(float(init_kl_coef), float(floor))
        self.target = float(target)
        self.horizon = int(horizon)
        self.floor = float(floor)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.floor, self.value * (1.0 + error * n_steps / self.horizon))

    def state_dict(self) -> dict[str, float]:
        """The coefficient is the only state; target and horizon are configuration, so a
        resumed run uses whatever its (possibly changed) config says."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = max(self.floor, float(state["value"]))


# --------------------------------------------------------------------------------------------
# Off-policy correction (rollouts sampled by another policy version)
# --------------------------------------------------------------------------------------------


def truncated_importance_weights(
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token importance weights [B, R] from the behaviour policy to the old policy,
    w = min(exp(old - behaviour), cap), detached, 0 on masked positions; and their statistics.

    When rollouts come from a generation pool serving an older policy version (the behaviour
    policy), the tokens are not samples of the policy PPO's ratio is taken against (the
    trainer's own, `old_logprobs`). Weighting each token's surrogate by pi_old / pi_behaviour
    corrects the expectation (decoupled PPO, Hilton et al. 2021, "Batch size-invariance for
    policy optimization"); truncating at `cap` bounds the variance a token the pool found far
    likelier than the trainer does not bring (truncated IS, as in IMPALA's V-trace). The weights
    carry no gradient: they re-weight samples, they are not part of what is optimised.

    The log-weight is clamped before the exponential, so even a huge difference gives the cap
    and never inf. `cap` must be >= 1: a cap below 1 would shrink tokens that are on-policy.
    Stats: "mean", the mean weight over real tokens; "capped_frac", the share of real tokens
    whose weight the cap cut.
    """
    if not cap >= 1.0:
        raise ValueError(f"the importance weight cap must be >= 1, got {cap}")
    mask = mask.bool()
    with torch.no_grad():
        log_weight = torch.where(
            mask, old_logprobs.float() - behaviour_logprobs.float(), torch.zeros_like(old_logprobs)
        )
        log_cap = math.log(cap)
        weights = torch.exp(log_weight.clamp(max=log_cap))
        weights = torch.where(mask, weights, torch.zeros_like(weights))
        stats = {
            "mean": masked_mean(weights, mask),
            "capped_frac": masked_mean((log_weight > log_cap).float(), mask),
        }
    return weights, stats
