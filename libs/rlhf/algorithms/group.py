"""Critic-free advantages from a group of answers to one prompt (GRPO, RLOO), as pure functions.

PPO learns a value function to tell a good answer from a lucky one; the critic-free methods
sample G answers to the same prompt instead and compare each answer's return with the others'.
No value head, no GAE, and the baseline is exact for the prompt at hand rather than a learned
guess. `rlhf.training.ppo` feeds these advantages to the same clipped surrogate as PPO's
(`rlhf.algorithms.ppo.policy_loss`).

Layout: rows are group-major, [B] = [B/G groups x G answers]: rows g*G .. g*G+G-1 answer the
same prompt. Every function checks that the batch holds whole groups.

Choices made here and in the update, and why:

- **The return is the KL-penalised reward, summed over the answer.** Each answer's return is its
  score (after the no-EOS penalty) minus kl_coef x the sum of its per-token KL to the reference:
  `rlhf.algorithms.ppo.compute_rewards` summed by `sequence_returns`, the same penalty, estimator
  and adaptive coefficient as PPO's. This is RLOO's formulation (Ahmadian et al. 2024, "Back to
  Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
  sec. 3: the KL term is part of the sequence reward). GRPO's paper puts a k3 estimate in the
  loss instead (Shao et al. 2024, "DeepSeekMath", eq. 3-4); we do not, for two reasons. First,
  the gradient of a KL estimate differentiated as a loss is not the gradient of the KL:
  differentiating k3 on the policy's own samples gives, in expectation, the gradient of the
  *forward* KL(ref || policy), not the reverse KL the penalty means (Tang & Munos 2025, "On a
  few pitfalls in KL divergence gradient estimation for RL"), whereas the penalty in the return
  is the score-function gradient of the reverse KL itself. Second, one mechanism for all three
  algorithms: the same `objective/kl`, target and controller, so switching algorithms changes the
  advantage estimator and nothing else, and the KL alarms and dashboards mean the same.
- **GRPO's std scaling is off by default** (`grpo_advantages(scale_by_std=...)`,
  RLHF_PPO_GRPO_SCALE_STD). Dividing by the group's std weights a prompt by how little its
  answers differ (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
  (Dr. GRPO), sec. 3.1: a difficulty bias). Here the scores come from a learned reward model, and
  the returns also carry the KL penalty: in a group whose answers the reward model scores alike,
  the std is that of its noise and of the KL terms, and dividing by it blows them up into
  unit-sized advantages. Unscaled, GRPO's advantage is RLOO's times (G - 1) / G.
- **A group whose returns are all equal gets advantage exactly 0** (not 0 / 0 = NaN, and not
  a rounding residue divided by a tiny std): it says nothing about which answer is better.
- **No whitening across the batch**: the advantages are already relative to each group, and
  shifting them by the batch mean would give a tied group a non-zero advantage.
- **Length normalisation is per token by default** (`rlhf.algorithms.ppo.aggregate`,
  RLHF_PPO_LOSS_AGGREGATION=token): every real token of the minibatch weighs the same, as DAPO
  (Yu et al. 2025, sec. 3.3, "token-level policy gradient loss") and Dr. GRPO (sec. 3.1)
  recommend and TRL's GRPOTrainer now defaults to. GRPO's paper averages each answer's tokens
  first ("sequence"), which gives each token of a short answer more weight than one of a long
  answer: a short good answer is reinforced more and a long bad answer punished less, so the
  policy drifts to long answers when it is wrong.
"""

from __future__ import annotations

import torch

from rlhf.algorithms.ppo import AllSum

# Added to the group's std before dividing (TRL's GRPO uses the same), so a nearly tied group's
# advantages are bounded by (spread / 1e-4) instead of exploding.
STD_EPS = 1e-4


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B / G, G], refusing a batch that does not hold whole groups."""
    if values.dim() != 1:
        raise ValueError(f"expected one value per answer, [B], got shape {tuple(values.shape)}")
    if group_size < 1 or values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} answers do not make groups of {group_size}")
    return values.reshape(-1, group_size)


def _tied(grouped: torch.Tensor) -> torch.Tensor:
    """Bool [B / G, 1]: whether every value of the group is the same."""
    return (grouped == grouped[:, :1]).all(dim=-1, keepdim=True)


def sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each answer's return [B]: its per-token rewards [B, R] summed over its real tokens.

    With `compute_rewards`' per-token rewards (-kl_coef x KL on every real token, the score at
    the last one) this is score - kl_coef x the answer's summed KL. Padding is selected away,
    not multiplied by 0, so an inf there cannot turn the sum into NaN.
    """
    return torch.where(mask.bool(), rewards, torch.zeros_like(rewards)).sum(dim=-1)


def grpo_advantages(
    returns: torch.Tensor, group_size: int, scale_by_std: bool = False
) -> torch.Tensor:
    """GRPO's advantages [B]: each return minus its group's mean, divided by the group's
    (unbiased) std + `STD_EPS` if `scale_by_std` (Shao et al. 2024, sec. 4.1.2).

    A tied group gets exactly 0 (see the module docstring). A group of one answer is always
    tied: there is nothing to compare it with.
    """
    grouped = _groups(returns.float(), group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if scale_by_std and group_size > 1:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + STD_EPS)
    return torch.where(_tied(grouped), torch.zeros_like(centred), centred).reshape(-1)


def rloo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages [B]: each return minus the mean of the *other* answers' returns.

    The baseline of answer i leaves answer i out, so it does not depend on the action being
    judged and the estimate stays unbiased (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
    Baseline for Free!"; Ahmadian et al. 2024, eq. 6). Algebraically r_i - (sum - r_i) / (G - 1)
    = G / (G - 1) x (r_i - mean): GRPO's unscaled advantage times G / (G - 1). Needs G >= 2.
    """
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 answers, got {group_size}")
    grouped = _groups(returns.float(), group_size)
    baseline = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    advantages = grouped - baseline
    return torch.where(_tied(grouped), torch.zeros_like(advantages), advantages).reshape(-1)


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sequence advantages -> [B, R]: every real token of an answer gets its answer's
    advantage (the outcome is credited to each action that led to it); padding gets 0."""
    spread = advantages.unsqueeze(-1).expand(mask.shape).to(torch.float32)
    return torch.where(mask.bool(), spread, torch.zeros_like(spread))


def group_reward_stats(
    scores: torch.Tensor, group_size: int, all_sum: AllSum | None = None
) -> dict[str, torch.Tensor]:
    """TRL GRPOTrainer's statistics of the groups' scores, over every rank's groups with
    `all_sum`: "reward_std", the mean over groups of the group's (unbiased) score std, and
    "frac_reward_zero_std", the share of groups whose answers all scored the same (they teach
    nothing but the KL penalty: too easy, too hard, or a reward model that cannot tell them
    apart)."""
    total = all_sum or (lambda t: t)
    grouped = _groups(scores.float(), group_size)
    std = grouped.std(dim=-1) if group_size > 1 else torch.zeros_like(grouped[:, 0])
    tied = _tied(grouped).squeeze(-1).float()
    count = torch.tensor(float(grouped.shape[0]), device=scores.device)
    sums = total(torch.stack([std.sum(), tied.sum(), count]))
    groups = sums[2].clamp(min=1.0)
    return {"reward_std": sums[0] / groups, "frac_reward_zero_std": sums[1] / groups}
