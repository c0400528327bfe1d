"""Truncated importance weights and the weighted clipped loss, on tensors worked out by hand.

(Kept beside test_ppo_algorithms.py: the off-policy correction of pool rollouts is its own
building block.)
"""

import math

import pytest
import torch

from rlhf.algorithms.ppo import policy_loss, truncated_importance_weights

T, F = True, False


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


def test_weights_are_the_probability_ratio_capped_and_zero_on_padding():
    # old - behaviour = [log 0.5, 0, log 3 | log 1.5, (pad: 50)]
    behaviour = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -60.0, 0.0]])
    old = behaviour + torch.tensor([[math.log(0.5), 0.0, math.log(3.0)], [math.log(1.5), 50, 0]])
    mask = torch.tensor([[T, T, T], [T, F, F]])
    weights, stats = truncated_importance_weights(old, behaviour, mask, cap=2.0)
    close(weights, [[0.5, 1.0, 2.0], [1.5, 0.0, 0.0]])
    close(stats["mean"], (0.5 + 1.0 + 2.0 + 1.5) / 4)
    close(stats["capped_frac"], 1 / 4)  # only the 3.0 was cut; padding's 50 nats are not counted


def test_weights_never_overflow_and_carry_no_gradient():
    old = torch.tensor([[500.0, 0.0]], requires_grad=True)
    behaviour = torch.tensor([[-500.0, 0.0]])
    weights, stats = truncated_importance_weights(old, behaviour, torch.tensor([[T, T]]), cap=3.0)
    close(weights, [[3.0, 1.0]])  # exp(1000) would be inf; the clamp comes first
    assert not weights.requires_grad and torch.isfinite(weights).all()
    close(stats["capped_frac"], 0.5)


def test_on_policy_samples_weigh_one_and_nothing_is_capped():
    logprobs = torch.tensor([[-0.3, -2.0, -0.1]])
    weights, stats = truncated_importance_weights(
        logprobs, logprobs.clone(), torch.ones(1, 3, dtype=torch.bool), cap=1.0
    )
    close(weights, [[1.0, 1.0, 1.0]])
    close(stats["capped_frac"], 0.0)


@pytest.mark.parametrize("cap", [0.5, 0.0, -1.0, float("nan")])
def test_a_cap_below_one_is_refused(cap):
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), cap)


def test_weights_multiply_each_tokens_clipped_term_and_the_mean_stays_over_real_tokens():
    # ratio = exp(logp - old) = [1, 2, 1 (pad)]; eps 0.2; advantages [1, -1, 5 (pad)]
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[0.0, math.log(2.0), 0.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[T, T, F]])
    weights = torch.tensor([[0.5, 2.0, 7.0]])
    loss, _ = policy_loss(logprobs, old, advantages, mask, 0.2, weights=weights)
    # token 0: max(-1 * 1, -1 * 1) = -1, weighted 0.5 -> -0.5
    # token 1: max(1 * 2, 1 * 1.2) = 2 (unclipped: a negative advantage is not clipped above),
    #          weighted 2 -> 4; mean over the 2 real tokens = 1.75
    close(loss, 1.75)
    loss.backward()
    # d/dlogp of weight * (-A * exp(logp - old)) / 2: token 0: 0.5 * -1 * 1 / 2; token 1:
    # 2 * 1 * 2 / 2; padding gets nothing however large its weight.
    close(logprobs.grad, [[-0.25, 2.0, 0.0]])


def test_unweighted_and_all_ones_weights_give_the_same_loss():
    logprobs = torch.tensor([[-0.2, -1.0], [-0.7, -0.1]])
    old = torch.tensor([[-0.5, -0.9], [-0.7, -0.6]])
    advantages = torch.tensor([[1.0, -2.0], [0.5, 1.5]])
    mask = torch.tensor([[T, T], [T, F]])
    plain, plain_stats = policy_loss(logprobs, old, advantages, mask, 0.2)
    ones, ones_stats = policy_loss(logprobs, old, advantages, mask, 0.2, torch.ones(2, 2))
    close(ones, plain.item())
    assert plain_stats.keys() == ones_stats.keys()
