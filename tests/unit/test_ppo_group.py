"""The critic-free pieces (rlhf.algorithms.group, and the loss aggregation in
rlhf.algorithms.ppo), pinned on hand-computed tensors, then one grpo / rloo step
(rlhf.training.ppo) on a tiny random Llama."""

import math

import pytest
import torch

from rlhf.algorithms.group import (
    STD_EPS,
    group_reward_stats,
    grpo_advantages,
    rloo_advantages,
    sequence_returns,
    token_advantages,
)
from rlhf.algorithms.ppo import FixedKLController, aggregate, policy_loss
from rlhf.training.ppo import ValueHead, ppo_step, score_rollout
from rlhf.training.ppo_config import PPOConfig
from tests.unit.test_ppo_step import HIDDEN, STAT_KEYS, hand_rollout, tiny_llama

T, F = True, False
INF = float("inf")


def test_grpo_subtracts_each_groups_mean():
    # Groups of 3: [1, 2, 6] has mean 3; [4, 0, 2] has mean 2.
    returns = torch.tensor([1.0, 2.0, 6.0, 4.0, 0.0, 2.0])
    expected = torch.tensor([-2.0, -1.0, 3.0, 2.0, -2.0, 0.0])
    torch.testing.assert_close(grpo_advantages(returns, 3), expected)


def test_grpo_can_divide_by_the_groups_unbiased_std():
    # [1, 2, 6]: squared deviations 4 + 1 + 9 = 14, over n - 1 = 2: std sqrt(7).
    returns = torch.tensor([1.0, 2.0, 6.0])
    expected = torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(7.0) + STD_EPS)
    torch.testing.assert_close(grpo_advantages(returns, 3, scale_by_std=True), expected)


def test_rloo_subtracts_the_mean_of_the_other_answers():
    # [1, 2, 6]: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5.
    returns = torch.tensor([1.0, 2.0, 6.0, 3.0, 5.0, 5.0])
    # [3, 5, 5]: baselines 5, 4, 4.
    expected = torch.tensor([-3.0, -1.5, 4.5, -2.0, 1.0, 1.0])
    torch.testing.assert_close(rloo_advantages(returns, 3), expected)


def test_rloo_is_unscaled_grpo_times_g_over_g_minus_1():
    returns = torch.randn(12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rloo_advantages(returns, 4), grpo_advantages(returns, 4) * 4 / 3)


@pytest.mark.parametrize(
    "advantages",
    [
        lambda r, g: grpo_advantages(r, g),
        lambda r, g: grpo_advantages(r, g, scale_by_std=True),
        lambda r, g: rloo_advantages(r, g),
    ],
    ids=["grpo", "grpo-std", "rloo"],
)
def test_a_group_whose_returns_are_all_equal_gets_exactly_zero_and_no_nan(advantages):
    # -7.3 and 0.1 are not exact in float32: the mean of three copies (or of the two others)
    # differs from them in the last bit (measured: 4.8e-7 and 7.5e-9), and divided by a std of
    # ~0 (+ eps) that residue becomes an advantage of 0.005.
    returns = torch.tensor([0.1, 0.1, 0.1, -7.3, -7.3, -7.3, 0.0, 1.0, 0.0])
    out = advantages(returns, 3)
    assert torch.isfinite(out).all(), out
    assert out[:6].tolist() == [0.0] * 6
    assert out[6:].abs().min() > 0  # the untied group still learns


def test_a_batch_that_does_not_hold_whole_groups_is_refused():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="groups of 2"):
        rloo_advantages(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="at least 2 answers"):
        rloo_advantages(torch.zeros(3), 1)


def test_sequence_returns_sum_real_tokens_only_and_ignore_junk_on_padding():
    rewards = torch.tensor([[0.5, -0.25, 2.0, INF], [1.0, INF, float("nan"), -INF]])
    mask = torch.tensor([[T, T, T, F], [T, F, F, F]])
    torch.testing.assert_close(sequence_returns(rewards, mask), torch.tensor([2.25, 1.0]))


def test_token_advantages_credit_every_real_token_and_no_padding():
    mask = torch.tensor([[T, T, F], [T, F, F], [F, F, F]])
    out = token_advantages(torch.tensor([2.0, -1.0, 5.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.0] * 3]))


def test_group_reward_stats_follow_trls_definitions():
    # Groups [1, 2, 6] (std sqrt 7) and [5, 5, 5] (std 0, all equal).
    stats = group_reward_stats(torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0]), 3)
    assert stats["reward_std"].item() == pytest.approx(math.sqrt(7.0) / 2)
    assert stats["frac_reward_zero_std"].item() == 0.5


def test_group_reward_stats_sum_over_ranks():
    halves = [torch.tensor([1.0, 2.0, 6.0]), torch.tensor([5.0, 5.0, 5.0])]
    local = group_reward_stats(halves[0], 3)
    other = group_reward_stats(halves[1], 3)

    def all_sum(t: torch.Tensor) -> torch.Tensor:  # rank 1's contribution added in by hand
        return t + torch.stack(
            [other["reward_std"], other["frac_reward_zero_std"], torch.tensor(1.0)]
        )

    stats = group_reward_stats(halves[0], 3, all_sum)
    assert local["frac_reward_zero_std"].item() == 0.0
    assert stats["reward_std"].item() == pytest.approx(math.sqrt(7.0) / 2)
    assert stats["frac_reward_zero_std"].item() == 0.5


def test_token_aggregation_weighs_every_token_and_sequence_each_answer():
    x = torch.tensor([[1.0, 2.0, 3.0, INF], [10.0, INF, INF, INF], [INF, INF, INF, INF]])
    mask = torch.tensor([[T, T, T, F], [T, F, F, F], [F, F, F, F]])
    # Tokens: (1 + 2 + 3 + 10) / 4. Answers: (mean 2 + mean 10) / 2; the empty row is no answer.
    assert aggregate(x, mask, "token").item() == 4.0
    assert aggregate(x, mask, "sequence").item() == 6.0
    with pytest.raises(ValueError, match="loss aggregation"):
        aggregate(x, mask, "batch")  # type: ignore[arg-type]


def test_policy_loss_aggregates_per_token_or_per_sequence_and_ignores_padding():
    # Ratio 1 everywhere (unchanged policy): the loss is minus the mean advantage. Padding holds
    # junk log-probabilities and advantages that must not reach the loss.
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, 50.0], [-1.0, 80.0, -90.0, 0.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0, 9.0], [4.0, -9.0, 9.0, 9.0]])
    mask = torch.tensor([[T, T, T, F], [T, F, F, F]])
    old = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    token, stats = policy_loss(logprobs, old, advantages, mask, 0.2)
    sequence, _ = policy_loss(logprobs, old, advantages, mask, 0.2, aggregation="sequence")
    assert token.item() == pytest.approx(-(3 * 1.0 + 4.0) / 4)
    assert sequence.item() == pytest.approx(-(1.0 + 4.0) / 2)
    assert stats["ratio"].item() == pytest.approx(1.0) and stats["clipfrac"].item() == 0.0


# One critic-free step on a tiny random Llama -----------------------------------------------


def _config(algorithm: str, **overrides) -> PPOConfig:
    return PPOConfig(algorithm=algorithm, group_size=2, **overrides)


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    # hand_rollout's scores [1, 0.5, -0.5, 0] with the no-EOS penalty (rows 0 and 3 never
    # end) are [0, 0.5, -0.5, -1]; groups of 2: [0, 0.5] (mean 0.25), [-0.5, -1] (mean -0.75).
    [("grpo", [-0.25, 0.25, 0.25, -0.25]), ("rloo", [-0.5, 0.5, 0.5, -0.5])],
)
def test_without_kl_each_answers_advantage_is_its_score_against_its_group(algorithm, expected):
    rollout = hand_rollout()
    config = _config(algorithm, no_eos_penalty=-1.0)
    scored, _ = score_rollout(tiny_llama(), None, tiny_llama(1), rollout, config, kl_coef=0.0)
    advantages = token_advantages(torch.tensor(expected), rollout.response_mask)
    torch.testing.assert_close(scored.advantages, advantages)
    assert scored.old_values is None and scored.returns is None


def test_the_kl_penalty_is_part_of_each_answers_return():
    rollout, coef = hand_rollout(), 0.5
    scored, _ = score_rollout(
        tiny_llama(), None, tiny_llama(1), rollout, _config("grpo"), kl_coef=coef
    )
    assert scored.kl[rollout.response_mask].abs().sum() > 0  # a different reference
    returns = scored.scores - coef * scored.kl.sum(dim=-1)
    expected = token_advantages(grpo_advantages(returns, 2), rollout.response_mask)
    torch.testing.assert_close(scored.advantages, expected)


@pytest.mark.parametrize("scale_std", [False, True])
def test_groups_that_all_scored_alike_leave_the_policy_where_it_was(scale_std):
    policy, rollout = tiny_llama(), hand_rollout()
    rollout.scores = torch.tensor([0.3, 0.3, -2.0, -2.0])
    rollout.ended = torch.tensor([T, T, T, T])
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    stats = ppo_step(
        policy,
        None,
        tiny_llama(1),
        torch.optim.SGD(policy.parameters(), lr=1.0),
        rollout,
        _config("grpo", ppo_epochs=2, minibatch_size=2, grpo_scale_std=scale_std),
        FixedKLController(0.0),  # the return is the score alone: every group is tied
    )
    for name, value in policy.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["frac_reward_zero_std"] == 1.0 and stats["reward_std"] == 0.0
    assert stats["loss/policy"] == 0.0


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_a_critic_free_step_trains_the_policy_and_reports_no_value_statistics(algorithm):
    policy = tiny_llama()
    before = [p.clone() for p in policy.parameters()]
    stats = ppo_step(
        policy,
        None,
        tiny_llama(1),
        torch.optim.Adam(policy.parameters(), lr=1e-3),
        hand_rollout(),
        _config(algorithm, ppo_epochs=2, minibatch_size=2),
        FixedKLController(0.1),
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    expected = (STAT_KEYS - {"val/clipfrac", "loss/value"}) | {
        "reward_std",
        "frac_reward_zero_std",
    }
    assert expected <= stats.keys() and not {"val/clipfrac", "loss/value"} & stats.keys()
    # Groups [0, 0.5] and [-0.5, -1] after the no-EOS penalty: std 0.5 / sqrt 2 each.
    assert stats["reward_std"] == pytest.approx(0.5 / math.sqrt(2), rel=1e-5)
    assert stats["frac_reward_zero_std"] == 0.0


def test_a_value_head_is_ppos_alone():
    policy = tiny_llama()
    args = (tiny_llama(1), torch.optim.SGD(policy.parameters(), lr=0.1), hand_rollout())
    with pytest.raises(ValueError, match="grpo needs no value head"):
        ppo_step(policy, ValueHead(HIDDEN), *args, _config("grpo"), FixedKLController(0.1))
    with pytest.raises(ValueError, match="ppo needs a value head"):
        ppo_step(policy, None, *args, PPOConfig(), FixedKLController(0.1))
