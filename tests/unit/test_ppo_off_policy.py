"""A PPO update on rollouts sampled by another policy version: behaviour logprobs in the
Rollout, truncated importance weights in the policy loss, lag and weight statistics (for GRPO's
critic-free update as for PPO's)."""

import copy
import math

import pytest
import torch

from rlhf.training.ppo import Rollout, ValueHead, build_rollout, forward_policy, ppo_step
from rlhf.training.ppo_config import PPOConfig
from tests.unit.test_ppo_step import EOS, HIDDEN, PAD, hand_rollout, make_optimizer, tiny_llama

OFF_POLICY_KEYS = {"policy/is_weight_mean", "policy/is_capped_frac", "rollout/policy_lag_max"}


def test_build_rollout_pads_behaviour_logprobs_and_keeps_versions():
    built = build_rollout(
        [[5, 6], [7]],
        [[20, 21, 22], [30]],
        [0.0, 1.0],
        PAD,
        EOS,
        behaviour_logprobs=[[-1.0, -2.0, -3.0], [-0.5]],
        policy_versions=[4, 3],
        latest_version=5,
    )
    assert built.behaviour_logprobs.tolist() == [[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]]
    assert built.policy_versions.tolist() == [4, 3] and built.latest_version == 5
    moved = built.to("cpu")
    assert torch.equal(moved.behaviour_logprobs, built.behaviour_logprobs)
    assert moved.latest_version == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"behaviour_logprobs": [[-1.0]], "policy_versions": None},
        {"behaviour_logprobs": [[-1.0, -1.0]], "policy_versions": [1]},  # 2 logprobs, 1 token
        {"behaviour_logprobs": [[-1.0]], "policy_versions": [1, 1]},
    ],
)
def test_build_rollout_refuses_behaviour_that_does_not_fit(kwargs):
    with pytest.raises(ValueError):
        build_rollout([[5]], [[20]], [0.0], PAD, EOS, **kwargs)


def _with_behaviour(rollout: Rollout, behaviour: torch.Tensor, versions, latest: int) -> Rollout:
    rollout = copy.copy(rollout)
    rollout.behaviour_logprobs = behaviour
    rollout.policy_versions = torch.tensor(versions)
    rollout.latest_version = latest
    return rollout


def _step(
    rollout: Rollout, cap: float = 2.0, algorithm: str = "ppo"
) -> tuple[dict[str, float], torch.nn.Module]:
    policy = tiny_llama()
    head = ValueHead(HIDDEN) if algorithm == "ppo" else None
    config = PPOConfig(  # for grpo, hand_rollout's rows are two groups of two answers
        ppo_epochs=2,
        minibatch_size=2,
        seed=3,
        importance_cap=cap,
        algorithm=algorithm,
        group_size=2,
    )
    stats = ppo_step(
        policy,
        head,
        tiny_llama(),
        make_optimizer(policy, head) if head else torch.optim.Adam(policy.parameters(), 1e-3),
        rollout,
        config,
        config.make_kl_controller(),
    )
    return stats, policy


def _policy_logprobs(rollout: Rollout, temperature: float = 0.7) -> torch.Tensor:
    """The step's own old logprobs: in the precision `_step` runs in (RLHF_PPO_DTYPE's
    default), so that a behaviour policy equal to the trained one weighs exactly 1."""
    with torch.no_grad():
        logprobs, _, _ = forward_policy(
            tiny_llama(),
            None,
            rollout.input_ids,
            rollout.attention_mask,
            3,
            temperature,
            dtype=PPOConfig().compute_dtype(),
        )
    return logprobs


def test_on_policy_behaviour_weighs_one_and_changes_nothing():
    rollout = hand_rollout()
    on_policy = _with_behaviour(rollout, _policy_logprobs(rollout), [2, 2, 2, 2], 2)
    plain_stats, plain_policy = _step(rollout)
    stats, policy = _step(on_policy)
    assert plain_stats.keys() >= OFF_POLICY_KEYS and stats.keys() >= OFF_POLICY_KEYS
    assert plain_stats["policy/is_weight_mean"] == 1.0 and plain_stats["policy/is_capped_frac"] == 0
    assert stats["policy/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/is_capped_frac"] == 0.0 and stats["rollout/policy_lag_max"] == 0.0
    assert stats["loss/policy"] == pytest.approx(plain_stats["loss/policy"], abs=1e-5)
    for trained, reference in zip(policy.parameters(), plain_policy.parameters(), strict=True):
        torch.testing.assert_close(trained, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_tokens_the_behaviour_policy_found_unlikely_are_capped_and_weigh_the_loss(algorithm):
    rollout = hand_rollout()
    old = _policy_logprobs(rollout)
    # Every token 3 nats less likely under the behaviour policy: raw weight e^3 > cap 2.
    far = _with_behaviour(rollout, old - 3.0, [5, 4, 6, 6], 6)
    stats, _ = _step(far, cap=2.0, algorithm=algorithm)
    assert stats["policy/is_capped_frac"] == 1.0
    assert stats["policy/is_weight_mean"] == pytest.approx(2.0)
    assert stats["rollout/policy_lag_max"] == 2.0  # v4 is two behind v6
    plain_stats, _ = _step(rollout, algorithm=algorithm)
    # The first minibatch's loss is taken before any step, so it doubles exactly; later ones
    # move apart, but the weighted loss is about twice the plain one throughout.
    assert stats["loss/policy"] / plain_stats["loss/policy"] == pytest.approx(2.0, rel=0.3)
    # Twice as likely under the behaviour policy: weight 0.5, nothing capped.
    half = _with_behaviour(rollout, old + math.log(2.0), [6, 6, 6, 6], 6)
    stats, _ = _step(half, algorithm=algorithm)
    assert stats["policy/is_weight_mean"] == pytest.approx(0.5, abs=1e-5)
    assert stats["policy/is_capped_frac"] == 0.0


def test_a_cap_below_one_is_refused_by_the_step():
    rollout = hand_rollout()
    off = _with_behaviour(rollout, _policy_logprobs(rollout), [1, 1, 1, 1], 1)
    with pytest.raises(ValueError, match="cap"):
        _step(off, cap=0.5)
