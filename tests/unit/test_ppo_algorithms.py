"""Pins each PPO building block on tiny tensors whose expected values are worked out by hand."""

import math

import pytest
import torch

from rlhf.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    apply_no_eos_penalty,
    compute_rewards,
    ended,
    entropy_from_logits,
    gae,
    kl_estimate,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    value_loss,
)

T, F = True, False


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


# ------------------------------------------------------------------------ masked statistics


def test_masked_mean_ignores_masked_positions():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[T, T, F], [T, T, F]])
    close(masked_mean(x, mask), 2.5)  # (1 + 2 + 3 + 4) / 4
    close(masked_mean(x, mask, dim=1), [1.5, 3.5])  # (1 + 2) / 2, (3 + 4) / 2


def test_masked_mean_of_nothing_is_zero_not_nan():
    close(masked_mean(torch.tensor([5.0, 6.0]), torch.tensor([F, F])), 0.0)


def test_masked_mean_is_not_poisoned_by_inf_or_nan_on_padding():
    x = torch.tensor([1.0, 3.0, float("inf"), float("nan")])
    close(masked_mean(x, torch.tensor([T, T, F, F])), 2.0)


def test_masked_var_biased_and_unbiased():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([T, T, T, F])
    # mean 2, squared deviations 1, 0, 1: biased 2/3, unbiased 2/2.
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    close(masked_var(x, mask, unbiased=True), 1.0)
    # A single real value has no spread, rather than dividing by n - 1 = 0.
    close(masked_var(x, torch.tensor([T, F, F, F])), 0.0)


def test_masked_whiten_uses_only_real_positions_and_zeroes_the_rest():
    mask = torch.tensor([T, T, F])
    # mean 2, unbiased var ((1-2)^2 + (3-2)^2) / 1 = 2: (x - 2) / sqrt(2).
    expected = [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]
    close(masked_whiten(torch.tensor([1.0, 3.0, 100.0]), mask), expected, atol=1e-4)
    close(masked_whiten(torch.tensor([1.0, 3.0, float("inf")]), mask), expected, atol=1e-4)
    # Without shifting, the mean 2 is added back: 2 -/+ 0.70711.
    unshifted = masked_whiten(torch.tensor([1.0, 3.0, 100.0]), mask, shift_mean=False)
    close(unshifted, [1.29289, 2.70711, 0.0], atol=1e-4)


# ----------------------------------------------------------------- log-probabilities, entropy


def test_logprobs_divide_logits_by_the_sampling_temperature():
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(3.0)]]])
    labels = torch.tensor([[2]])
    # T=1: softmax = (1, 2, 3) / 6, so log p(2) = log(3/6) = -0.693147.
    close(logprobs_from_logits(logits, labels, 1.0), [[-0.693147]])
    # T=0.5: logits double, exp gives (1, 4, 9) / 14, so log p(2) = log(9/14) = -0.441833.
    close(logprobs_from_logits(logits, labels, 0.5), [[-0.441833]])


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_logprobs_reject_a_greedy_or_negative_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), temperature)


def test_entropy_per_position():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(3.0), -1e4]]])
    # Uniform over 4: log 4 = 1.386294. p = (1/6, 1/3, 1/2, ~0):
    # 1/6 * 1.791759 + 1/3 * 1.098612 + 1/2 * 0.693147 = 0.298627 + 0.366204 + 0.346574.
    close(entropy_from_logits(logits), [[1.386294, 1.011404]])


# ---------------------------------------------------------------------- real response tokens


def test_response_mask_keeps_the_first_eos_and_drops_what_follows_and_pads():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 2, 0, 0],  # EOS then pads: the EOS is real
            [5, 6, 7, 8],  # never ended: everything real
            [5, 2, 9, 2],  # tokens after the first EOS are not real, even non-pad ones
            [2, 0, 0, 0],  # empty answer: only the EOS
            [5, 0, 0, 0],  # stopped without EOS: pads are not real
        ]
    )
    expected = [[T, T, F, F], [T, T, T, T], [T, T, F, F], [T, F, F, F], [T, F, F, F]]
    assert response_mask(ids, eos, pad).tolist() == expected
    assert ended(ids, eos).tolist() == [T, F, T, T, F]


def test_response_mask_when_pad_is_eos_still_counts_the_first_eos():
    # Many tokenizers pad with EOS. Masking "!= pad" alone would drop the EOS the policy emitted.
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]])
    assert response_mask(ids, eos_id=2, pad_id=2).tolist() == [[T, T, F, F], [T, T, T, T]]
    # With a distinct pad id, a row that stopped without EOS has the same mask as one that
    # ended, so only `ended` (which looks for the EOS id, not the pad id) tells them apart.
    ids = torch.tensor([[5, 2, 0], [5, 6, 0]])
    assert response_mask(ids, eos_id=2, pad_id=0).tolist() == [[T, T, F], [T, T, F]]
    assert ended(ids, eos_id=2).tolist() == [T, F]


def test_last_token_index():
    mask = torch.tensor([[T, T, F, F], [T, T, T, T], [F, F, F, F]])
    assert last_token_index(mask).tolist() == [1, 3, -1]


# -------------------------------------------------------------------------------- KL, rewards


def test_kl_estimators_on_known_numbers():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -1.0, -0.5])
    # k1 = logp - ref: negative when the reference likes the token more.
    close(kl_estimate(logp, ref, "k1"), [1.0, -1.0, 0.0])
    # k3 = (r - 1) - log r, r = exp(ref - logp) = e^-1, e^1, 1:
    # 0.367879 - 1 + 1 = 0.367879; 2.718282 - 1 - 1 = 0.718282; 0.
    close(kl_estimate(logp, ref, "k3"), [0.367879, 0.718282, 0.0])


def test_k3_is_never_negative():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=gen) * 3, torch.randn(1000, generator=gen) * 3
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()


def test_kl_estimate_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k2")


def test_score_is_credited_at_the_last_real_token_not_the_last_column():
    scores = torch.tensor([1.0, 2.0, 3.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[T, T, F], [T, T, T], [F, F, F]])
    rewards, kl = compute_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k1")
    # Row 0: k1 = 0.5, -1.0, (masked) -> rewards -0.05, 0.1 + score 1.0, 0.
    # Row 1: no KL, score 2.0 at column 2. Row 2: no real token, so no reward at all.
    close(kl, [[0.5, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 1.1, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])


def test_kl_penalty_skips_post_eos_positions_even_where_the_estimate_overflows():
    # Column 1 is after the EOS. There the policy finds the pad 180 nats less likely than the
    # reference does: k3 = expm1(180) - 180 overflows to inf in float32, and inf * 0 is NaN.
    scores = torch.tensor([1.0, 0.5])
    logp = torch.tensor([[-1.0, -200.0], [-2.0, -1.0]])
    ref = torch.tensor([[-1.5, -20.0], [-2.0, -1.0]])
    mask = torch.tensor([[T, F], [T, T]])
    rewards, kl = compute_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k3")
    # Row 0, column 0: r = e^-0.5 = 0.606531, k3 = 0.606531 - 1 + 0.5 = 0.106531;
    # reward -0.1 * 0.106531 + score 1.0 = 0.989347. Row 1: no KL, score 0.5 at column 1.
    close(kl, [[0.106531, 0.0], [0.0, 0.0]])
    close(rewards, [[0.989347, 0.0], [0.0, 0.5]])


def test_no_eos_penalty_is_added_to_unfinished_responses_only():
    scores = torch.tensor([0.5, 0.5, -0.2])
    # 0.5 kept; 0.5 - 1 = -0.5; -0.2 - 1 = -1.2.
    close(apply_no_eos_penalty(scores, torch.tensor([T, F, F]), -1.0), [0.5, -0.5, -1.2])


# -------------------------------------------------------------------------------------- GAE


def test_gae_three_steps_by_hand():
    values = torch.tensor([[0.5, 0.2, -0.1]])
    rewards = torch.tensor([[0.0, 0.1, 1.0]])
    mask = torch.tensor([[T, T, T]])
    advantages, returns = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 1.0 + 0 (episode end) - (-0.1) = 1.1;            A2 = 1.1
    # t=1: delta = 0.1 + (-0.1) - 0.2 = -0.2;  A1 = -0.2 + 0.95 * 1.1 = 0.845
    # t=0: delta = 0.0 + 0.2 - 0.5 = -0.3;     A0 = -0.3 + 0.95 * 0.845 = 0.50275
    close(advantages, [[0.50275, 0.845, 1.1]])
    close(returns, [[1.00275, 1.045, 1.0]])  # A + V


def test_gae_ignores_masked_positions():
    # The same episode followed by two padding positions with junk values and rewards.
    values = torch.tensor([[0.5, 0.2, -0.1, 7.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.1, 1.0, 5.0, 5.0]])
    mask = torch.tensor([[T, T, T, F, F]])
    advantages, returns = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.50275, 0.845, 1.1, 0.0, 0.0]])
    close(returns, [[1.00275, 1.045, 1.0, 0.0, 0.0]])


def test_gae_is_not_poisoned_by_inf_or_nan_on_padding():
    values = torch.tensor([[0.5, 0.2, -0.1, float("nan")]])
    rewards = torch.tensor([[0.0, 0.1, 1.0, float("inf")]])
    advantages, returns = gae(values, rewards, torch.tensor([[T, T, T, F]]), 1.0, 0.95)
    close(advantages, [[0.50275, 0.845, 1.1, 0.0]])  # as in the three-step example
    close(returns, [[1.00275, 1.045, 1.0, 0.0]])


def test_gae_discounts_with_gamma():
    # gamma=0.5, lam=1, V = (1, 2), r = (0, 4):
    # t=1: delta = 4 + 0 - 2 = 2;          A1 = 2
    # t=0: delta = 0 + 0.5 * 2 - 1 = 0;    A0 = 0 + 0.5 * 1 * 2 = 1
    # Returns A + V = (2, 4): with lam=1 the discounted Monte Carlo returns 0 + 0.5 * 4 and 4.
    advantages, returns = gae(
        torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]), torch.tensor([[T, T]]), 0.5, 1.0
    )
    close(advantages, [[1.0, 2.0]])
    close(returns, [[2.0, 4.0]])


# ----------------------------------------------------------------------------------- losses


def test_policy_loss_clips_in_the_direction_the_advantage_rewards():
    old = torch.zeros(1, 5)
    ratios = [1.5, 0.5, 1.0, 1.5, float("inf")]  # junk on the masked token must not leak
    logp = torch.log(torch.tensor([ratios])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 9.0]])
    mask = torch.tensor([[T, T, T, T, F]])
    loss, stats = policy_loss(logp, old, advantages, mask, clip_range=0.2)
    # token 0: r=1.5, A=+1: max(-1.5, -1.2) = -1.2, clipped (no gain past 1.2)
    # token 1: r=0.5, A=-1: max(0.5, 0.8) = 0.8, clipped (no gain below 0.8)
    # token 2: r=1.0, A=+1: -1.0, unclipped
    # token 3: r=1.5, A=-1: max(1.5, 1.2) = 1.5, unclipped (a bad move is never forgiven)
    # token 4 is masked. loss = (-1.2 + 0.8 - 1.0 + 1.5) / 4 = 0.025
    close(loss, 0.025)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], 1.125)  # (1.5 + 0.5 + 1.0 + 1.5) / 4
    # 0.5 * mean(log r^2) = 0.5 * (0.164402 + 0.480453 + 0 + 0.164402) / 4 = 0.101157
    close(stats["approx_kl"], 0.101157)
    loss.backward()
    # Clipped tokens get no gradient; d(-A r)/d log p = -A r, divided by 4 real tokens.
    close(logp.grad, [[0.0, 0.0, -0.25, 0.375, 0.0]])


def test_value_loss_clips_moves_away_from_the_old_value():
    old_values = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, -0.1, 0.5, 30.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[T, T, T, F]])
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0: v=0.5 -> clipped 0.2: max((0.5-1)^2, (0.2-1)^2) = max(0.25, 0.64) = 0.64, clipped
    # token 1: v=-0.1 inside the range: (-0.1-1)^2 = 1.21
    # token 2: v=0.5 -> 0.2, R=-1: max(2.25, 1.44) = 2.25, unclipped
    # loss = 0.5 * (0.64 + 1.21 + 2.25) / 3 = 0.683333
    close(loss, 0.683333)
    close(clipfrac, 1.0 / 3.0)


# ------------------------------------------------------------------------------ controllers


def test_adaptive_kl_rises_above_target_with_clipped_error():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=100)
    # error = 9/6 - 1 = 0.5, clipped to 0.2: 0.1 * (1 + 0.2 * 100 / 10000) = 0.1002
    assert ctl.value == pytest.approx(0.1002)


def test_adaptive_kl_falls_below_target():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=5.4, n_steps=1000)
    # error = 5.4/6 - 1 = -0.1: 0.1 * (1 - 0.1 * 1000 / 10000) = 0.099
    assert ctl.value == pytest.approx(0.099)
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=0.0, n_steps=10000)
    # error = -1, clipped to -0.2: 0.1 * (1 - 0.2) = 0.08
    assert ctl.value == pytest.approx(0.08)
    ctl.update(current_kl=6.0, n_steps=10000)  # on target: unchanged
    assert ctl.value == pytest.approx(0.08)


def test_adaptive_kl_floor_stops_the_decay_and_the_climb_starts_from_it():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=64, floor=0.1)
    for _ in range(40):  # far under target: without the floor 0.1 * 0.95^40 = 0.013
        ctl.update(current_kl=1.0, n_steps=16)
    assert ctl.value == 0.1
    ctl.update(current_kl=12.0, n_steps=16)  # over target: up 5% from the floor at once
    assert ctl.value == pytest.approx(0.105)
    free = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=64)
    for _ in range(40):
        free.update(current_kl=1.0, n_steps=16)
    assert free.value == pytest.approx(0.1 * 0.95**40)
    with pytest.raises(ValueError, match="floor"):
        AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=64, floor=-0.1)
    assert AdaptiveKLController(0.05, target=6.0, horizon=64, floor=0.1).value == 0.1
    # A run resumed with a floor it did not have before starts at the floor, not under it.
    raised = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=64, floor=0.1)
    raised.load_state_dict(free.state_dict())
    assert raised.value == 0.1


def test_fixed_kl_controller_is_constant():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=10000)
    ctl.update(current_kl=0.0, n_steps=10000)
    assert ctl.value == 0.05


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, n_steps=10)  # 0.1 * 1.02 = 0.102
    resumed = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=100)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == pytest.approx(0.102)
    ctl.update(current_kl=1.0, n_steps=10)
    resumed.update(current_kl=1.0, n_steps=10)
    assert resumed.value == ctl.value

    fixed = FixedKLController(0.3)
    fixed.load_state_dict(FixedKLController(0.07).state_dict())
    assert fixed.value == 0.07


def test_whitening_split_across_ranks_equals_whitening_the_whole_batch():
    """Two 'ranks' (threads) holding halves of a batch, summing through a barrier the way an
    all-reduce does, whiten exactly as one process holding all of it."""
    import threading

    x = torch.tensor([[1.0, 2.0, 9.0], [4.0, -3.0, 0.5], [7.0, 7.5, 2.0], [0.0, 1.0, 3.0]])
    mask = torch.tensor([[T, T, F], [T, T, T], [T, F, F], [T, T, T]])
    whole = masked_whiten(x, mask)
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    posted: list[torch.Tensor | None] = [None, None]
    barrier = threading.Barrier(2)
    results: list[torch.Tensor | None] = [None, None]

    def run(rank: int) -> None:
        def all_sum(t: torch.Tensor) -> torch.Tensor:
            posted[rank] = t
            barrier.wait()
            total = posted[0] + posted[1]
            barrier.wait()  # both have read before either posts its next tensor
            return total

        results[rank] = masked_whiten(*halves[rank], all_sum=all_sum)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(torch.cat([results[0], results[1]]), whole, atol=1e-6, rtol=0)
    # Each half whitened on its own would not be: the split matters.
    assert not torch.allclose(masked_whiten(*halves[0]), whole[:2], atol=1e-3)
