"""One PPO update end to end on a tiny random Llama."""

import copy
import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.algorithms.ppo import AdaptiveKLController, FixedKLController
from rlhf.models import load_tokenizer
from rlhf.training import ppo as ppo_module
from rlhf.training.ppo import (
    Rollout,
    UpdateGivenUp,
    ValueHead,
    build_rollout,
    forward_policy,
    ppo_step,
    score_rollout,
)
from rlhf.training.ppo_config import PPOConfig

PAD, EOS = 0, 2
HIDDEN = 32
T, F = True, False

STAT_KEYS = {
    "objective/kl",
    "objective/kl_coef",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/entropy",
    "policy/clipfrac",
    "policy/approxkl",
    "val/ratio",
    "val/clipfrac",
    "loss/policy",
    "loss/value",
    "response/length",
    "response/ended_frac",
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def hand_rollout() -> Rollout:
    """Batch 4, P=3 (row 1 left-padded), R=5 (row 1 ends early in EOS, then pads)."""
    input_ids = torch.tensor(
        [
            [5, 6, 7, 20, 21, 22, 23, 24],
            [0, 8, 9, 30, 2, 0, 0, 0],
            [10, 11, 12, 40, 41, 42, 43, 2],
            [13, 14, 15, 50, 51, 52, 53, 54],
        ]
    )
    attention_mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_width=3,
        response_ids=input_ids[:, 3:],
        response_mask=attention_mask[:, 3:].bool(),
        scores=torch.tensor([1.0, 0.5, -0.5, 0.0]),
        ended=torch.tensor([F, T, T, F]),
    )


def make_optimizer(policy, value_head, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam([*policy.parameters(), *value_head.parameters()], lr=lr)


def test_build_rollout_matches_the_hand_built_layout():
    built = build_rollout(
        prompts=[[5, 6, 7], [8, 9], [10, 11, 12], [13, 14, 15]],
        responses=[[20, 21, 22, 23, 24], [30, 2], [40, 41, 42, 43, 2], [50, 51, 52, 53, 54]],
        scores=[1.0, 0.5, -0.5, 0.0],
        pad_id=PAD,
        eos_id=EOS,
    )
    expected = hand_rollout()
    assert built.prompt_width == expected.prompt_width
    for field in ("input_ids", "attention_mask", "response_ids", "response_mask", "ended"):
        assert torch.equal(getattr(built, field), getattr(expected, field)), field
    torch.testing.assert_close(built.scores, expected.scores)


def test_build_rollout_with_pad_equal_to_eos_does_not_count_padding_as_an_ending():
    built = build_rollout([[5], [5]], [[6, 7], [2]], [0.0, 0.0], pad_id=EOS, eos_id=EOS)
    assert built.response_mask.tolist() == [[T, T], [T, F]]
    assert built.ended.tolist() == [F, T]


def _hand_lists() -> dict:
    return dict(
        prompts=[[5, 6, 7], [8, 9], [10, 11, 12], [13, 14, 15]],
        responses=[[20, 21, 22, 23, 24], [30, 2], [40, 41, 42, 43, 2], [50, 51, 52, 53, 54]],
        scores=[1.0, 0.5, -0.5, 0.0],
        pad_id=PAD,
        eos_id=EOS,
    )


def test_build_rollout_pads_the_width_up_to_a_multiple_with_masked_response_columns():
    exact = build_rollout(**_hand_lists())
    padded = build_rollout(**_hand_lists(), pad_to_multiple=16)
    assert exact.input_ids.shape == (4, 8) and padded.input_ids.shape == (4, 16)
    assert padded.prompt_width == exact.prompt_width  # responses still start at column P
    assert torch.equal(padded.input_ids[:, :8], exact.input_ids)
    assert torch.equal(padded.response_mask[:, :5], exact.response_mask)
    assert not padded.response_mask[:, 5:].any() and not padded.attention_mask[:, 8:].any()
    assert (padded.input_ids[:, 8:] == PAD).all()
    assert torch.equal(padded.ended, exact.ended)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        build_rollout(**_hand_lists(), pad_to_multiple=0)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_step_on_a_padded_rollout_is_the_step_on_the_exact_one(algorithm):
    """The extra columns are masked everywhere: statistics and the update are the same (in
    float32; SGD, so the update is the gradients' and not Adam's sign of near-zero noise)."""

    def run(multiple: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        policy, head = tiny_llama(), ValueHead(HIDDEN)
        torch.nn.init.normal_(head.linear.weight, std=0.1)
        trained = [*policy.parameters(), *head.parameters()]
        config = PPOConfig(
            algorithm=algorithm,
            group_size=2,
            ppo_epochs=2,
            minibatch_size=2,
            seed=3,
            dtype="float32",
        )
        stats = ppo_step(
            policy,
            head if algorithm == "ppo" else None,
            tiny_llama(seed=1),
            torch.optim.SGD(trained if algorithm == "ppo" else policy.parameters(), lr=0.1),
            build_rollout(**_hand_lists(), pad_to_multiple=multiple),
            config,
            config.make_kl_controller(),
        )
        return stats, policy.state_dict()

    exact_stats, exact_weights = run(1)
    padded_stats, padded_weights = run(16)
    assert padded_stats.keys() == exact_stats.keys()
    for key, value in exact_stats.items():
        assert padded_stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for name, weight in exact_weights.items():
        torch.testing.assert_close(padded_weights[name], weight, rtol=1e-4, atol=1e-6)


def test_value_head_starts_at_zero():
    head = ValueHead(HIDDEN)
    assert torch.equal(head(torch.randn(2, 3, HIDDEN)), torch.zeros(2, 3))


def test_config_makes_the_right_kl_controller():
    assert isinstance(PPOConfig().make_kl_controller(), AdaptiveKLController)
    fixed = PPOConfig(adaptive_kl=False, init_kl_coef=0.2).make_kl_controller()
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.2
    floored = PPOConfig(init_kl_coef=0.2, min_kl_coef=0.2).make_kl_controller()
    assert isinstance(floored, AdaptiveKLController) and floored.floor == 0.2


def test_forward_policy_reads_the_logits_one_position_before_each_response_token():
    model = tiny_llama()
    input_ids = torch.tensor([[5, 6, 7, 20, 21]])
    logprobs, values, entropy = forward_policy(
        model, None, input_ids, torch.ones_like(input_ids), prompt_width=3, temperature=0.7
    )
    assert values is None
    with torch.no_grad():
        logits = model(input_ids).logits[0]
    # Token 20 (column 3) is predicted by column 2, token 21 by column 3, at temperature 0.7.
    expected = [
        torch.log_softmax(logits[2] / 0.7, -1)[20].item(),
        torch.log_softmax(logits[3] / 0.7, -1)[21].item(),
    ]
    torch.testing.assert_close(logprobs[0], torch.tensor(expected), atol=1e-5, rtol=0)
    assert entropy.shape == (1, 2)


def test_forward_policy_is_invariant_to_left_padding():
    model = tiny_llama()
    head = ValueHead(HIDDEN)
    torch.nn.init.normal_(head.linear.weight)  # non-zero so the values are compared too
    alone = torch.tensor([[8, 9, 30, 31, 2]])
    padded = torch.tensor([[0, 0, 8, 9, 30, 31, 2], [4, 5, 6, 7, 40, 41, 42]])
    padded_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        lp_alone, v_alone, _ = forward_policy(
            model, head, alone, torch.ones_like(alone), prompt_width=2, temperature=0.7
        )
        lp_padded, v_padded, _ = forward_policy(
            model, head, padded, padded_mask, prompt_width=4, temperature=0.7
        )
    torch.testing.assert_close(lp_padded[0], lp_alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_padded[0], v_alone[0], atol=1e-5, rtol=1e-5)


def test_ppo_step_updates_the_policy_and_not_the_reference():
    policy = tiny_llama()
    reference = copy.deepcopy(policy).requires_grad_(False)
    head = ValueHead(HIDDEN)
    policy_before = copy.deepcopy(policy.state_dict())
    reference_before = copy.deepcopy(reference.state_dict())
    config = PPOConfig(ppo_epochs=2, minibatch_size=2)
    controller = config.make_kl_controller()

    stats = ppo_step(
        policy, head, reference, make_optimizer(policy, head), hand_rollout(), config, controller
    )

    assert stats.keys() >= STAT_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values()), stats
    # The policy starts equal to the reference, so the rollout's KL is 0 before any update.
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["objective/kl_coef"] == config.init_kl_coef
    # Scores 1.0, 0.5, -0.5, 0.0; rows 0 and 3 never ended: 0.0 and -1.0 -> mean -0.25.
    assert stats["objective/scores"] == pytest.approx(-0.25)
    assert stats["objective/rlhf_reward"] == pytest.approx(-0.25, abs=1e-6)
    assert stats["response/length"] == pytest.approx(4.25)  # (5 + 2 + 5 + 5) / 4
    assert stats["response/ended_frac"] == pytest.approx(0.5)
    # KL 0 is below the target, so the adaptive coefficient shrank.
    assert controller.value < config.init_kl_coef

    assert any(not torch.equal(policy_before[k], v) for k, v in policy.state_dict().items()), (
        "policy did not change"
    )
    for k, v in reference.state_dict().items():
        assert torch.equal(reference_before[k], v), k
    assert head.linear.weight.abs().sum() > 0, "value head did not learn"


def test_a_stop_gives_the_update_up_before_its_next_minibatch():
    """2 epochs of 2 minibatches, told to stop after 2 minibatch steps: the weights are those of
    the first epoch alone (the epochs' shuffles are drawn up front, so the first epoch is the
    same), the KL controller is not updated, and the step count says what the weights hold."""
    config = PPOConfig(ppo_epochs=2, minibatch_size=2)

    def run(config, stopping=None):
        policy, head = tiny_llama(), ValueHead(HIDDEN)
        torch.nn.init.normal_(head.linear.weight, std=0.1)
        reference = copy.deepcopy(policy).requires_grad_(False)
        optimizer, controller = make_optimizer(policy, head), config.make_kl_controller()
        args = (policy, head, reference, optimizer, hand_rollout(), config, controller)
        if stopping is None:
            ppo_step(*args)
        else:
            with pytest.raises(UpdateGivenUp) as given_up:
                ppo_step(*args, stopping=stopping)
            assert controller.value == config.init_kl_coef  # the step did not finish
            return policy, head, given_up.value
        return policy, head, None

    asked: list[bool] = []

    def after_two_minibatches() -> bool:
        asked.append(True)
        return len(asked) > 2  # asked before each minibatch: the third one is given up

    policy, head, given_up = run(config, after_two_minibatches)
    assert given_up.steps == 2 and str(given_up) == (
        "update given up on stop after 2 of 4 minibatch steps"
    )
    one_epoch, one_epoch_head, _ = run(dataclasses.replace(config, ppo_epochs=1))
    for name, weight in one_epoch.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[name], weight, msg=name)
    torch.testing.assert_close(head.linear.weight, one_epoch_head.linear.weight)

    untouched, _, given_up = run(config, lambda: True)
    assert given_up.steps == 0
    for name, weight in tiny_llama().state_dict().items():
        assert torch.equal(untouched.state_dict()[name], weight), name


def test_ppo_step_is_deterministic_given_the_seed():
    def run() -> dict[str, float]:
        policy = tiny_llama()
        head = ValueHead(HIDDEN)
        config = PPOConfig(ppo_epochs=1, minibatch_size=2, seed=3)
        optimizer = make_optimizer(policy, head)
        controller = config.make_kl_controller()
        return ppo_step(policy, head, tiny_llama(), optimizer, hand_rollout(), config, controller)

    assert run() == run()


def response_logprob(policy, rollout: Rollout, row: int, temperature: float) -> float:
    with torch.no_grad():
        logprobs, _, _ = forward_policy(
            policy,
            None,
            rollout.input_ids[row : row + 1],
            rollout.attention_mask[row : row + 1],
            rollout.prompt_width,
            temperature,
        )
    return (logprobs * rollout.response_mask[row : row + 1]).sum().item()


def test_repeated_ppo_steps_make_the_rewarded_response_more_likely():
    policy = tiny_llama()
    reference = copy.deepcopy(policy).requires_grad_(False)
    head = ValueHead(HIDDEN)
    good, bad = [20, 21, 22, EOS], [30, 31, 32, EOS]
    rollout = build_rollout(
        prompts=[[5, 6, 7]] * 4,
        responses=[good, bad, good, bad],
        scores=[1.0, -1.0, 1.0, -1.0],
        pad_id=PAD,
        eos_id=EOS,
    )
    config = PPOConfig(ppo_epochs=2, minibatch_size=4)
    optimizer = make_optimizer(policy, head, lr=3e-3)
    controller = config.make_kl_controller()
    generator = torch.Generator().manual_seed(0)
    good_before = response_logprob(policy, rollout, 0, config.temperature)
    bad_before = response_logprob(policy, rollout, 1, config.temperature)

    for _ in range(8):
        stats = ppo_step(policy, head, reference, optimizer, rollout, config, controller, generator)

    assert response_logprob(policy, rollout, 0, config.temperature) > good_before + 5.0
    assert response_logprob(policy, rollout, 1, config.temperature) < bad_before - 5.0
    # The policy has moved away from the reference. k1 is only an unbiased KL on responses
    # sampled from the policy; on this fixed rollout half the tokens lost probability, so the
    # sum can come out negative: only its size says anything here.
    assert abs(stats["objective/kl"]) > 0.1


def test_scoring_pass_by_hand_reward_at_the_last_token_then_gae_then_whitening():
    # The policy equals the reference (KL 0) and the value head starts at 0, so everything
    # after the forward passes is hand-computable from the scores alone.
    policy = tiny_llama()
    reference = copy.deepcopy(policy)
    config = PPOConfig(gamma=1.0, lam=0.95, no_eos_penalty=-1.0, whiten_advantages=False)
    with torch.no_grad():
        raw, _ = score_rollout(policy, ValueHead(HIDDEN), reference, hand_rollout(), config, 0.05)
    # Scores 1.0, 0.5, -0.5, 0.0; rows 0 and 3 never ended: 1 - 1 = 0, 0.5, -0.5, 0 - 1 = -1.
    torch.testing.assert_close(raw.scores, torch.tensor([0.0, 0.5, -0.5, -1.0]))
    assert torch.equal(raw.kl, torch.zeros(4, 5))
    assert torch.equal(raw.old_values, torch.zeros(4, 5))
    # With V = 0 and gamma = 1, A_t = 0.95^(steps to the last real token) * score there.
    decay5 = [0.95**4, 0.95**3, 0.95**2, 0.95, 1.0]
    expected = [
        [0.0] * 5,
        [0.95 * 0.5, 0.5, 0.0, 0.0, 0.0],  # ends at column 1 (its EOS); then padding
        [-0.5 * d for d in decay5],
        [-1.0 * d for d in decay5],
    ]
    torch.testing.assert_close(raw.advantages, torch.tensor(expected))
    torch.testing.assert_close(raw.returns, torch.tensor(expected))  # A + V, V = 0

    config = dataclasses.replace(config, whiten_advantages=True)
    with torch.no_grad():
        white, _ = score_rollout(policy, ValueHead(HIDDEN), reference, hand_rollout(), config, 0.05)
    real = [a for row, n in zip(expected, [5, 2, 5, 5], strict=True) for a in row[:n]]
    mean = sum(real) / len(real)
    std = math.sqrt(sum((a - mean) ** 2 for a in real) / (len(real) - 1))
    mask = hand_rollout().response_mask
    whitened = [
        [(a - mean) / std if m else 0.0 for a, m in zip(row, mask_row, strict=True)]
        for row, mask_row in zip(expected, mask.tolist(), strict=True)
    ]
    torch.testing.assert_close(white.advantages, torch.tensor(whitened), atol=1e-5, rtol=0)
    # Whitening is for the policy loss only: the value head still regresses on raw returns.
    torch.testing.assert_close(white.returns, torch.tensor(expected))


@pytest.mark.parametrize(("minibatch_size", "sizes"), [(2, [2, 2]), (3, [3, 1])])
def test_each_epoch_visits_every_row_once_in_shuffled_minibatches(minibatch_size, sizes):
    policy = tiny_llama()
    head = ValueHead(HIDDEN)
    optimizer = make_optimizer(policy, head)
    calls: list[list[int]] = []
    steps = []

    def record(_module, _args, kwargs):
        calls.append(kwargs["input_ids"][:, 3].tolist())  # each row's first response token

    policy.register_forward_pre_hook(record, with_kwargs=True)
    step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    config = PPOConfig(ppo_epochs=3, minibatch_size=minibatch_size)
    ppo_step(policy, head, tiny_llama(), optimizer, hand_rollout(), config, FixedKLController(0.1))

    # The scoring pass runs the first minibatch's rows with autograd on, and that forward is
    # the first minibatch's: only the other rows are scored separately, and never re-run.
    first, rest, *others = calls
    assert sorted(first + rest) == [20, 30, 40, 50]
    minibatches = [first, *others]
    assert [len(m) for m in minibatches] == sizes * 3
    assert len(steps) == len(minibatches), "one optimizer step per minibatch"
    per_epoch = len(sizes)
    epochs = [minibatches[i : i + per_epoch] for i in range(0, len(minibatches), per_epoch)]
    for epoch in epochs:
        assert sorted(row for m in epoch for row in m) == [20, 30, 40, 50]
    assert len({tuple(row for m in e for row in m) for e in epochs}) > 1, "never reshuffled"


def test_gradients_are_clipped_jointly_over_policy_and_value_head():
    def step_norms(max_grad_norm: float) -> list[float]:
        policy = tiny_llama()
        head = ValueHead(HIDDEN)
        optimizer = make_optimizer(policy, head)
        params = [*policy.parameters(), *head.parameters()]
        norms = []
        step = optimizer.step

        def checked_step(*args, **kwargs):
            grads = [p.grad.norm() for p in params if p.grad is not None]
            norms.append(torch.stack(grads).norm().item())
            return step(*args, **kwargs)

        optimizer.step = checked_step
        config = PPOConfig(ppo_epochs=2, minibatch_size=2, max_grad_norm=max_grad_norm)
        ppo_step(
            policy, head, tiny_llama(), optimizer, hand_rollout(), config, FixedKLController(0.1)
        )
        return norms

    unclipped = step_norms(1e9)
    assert min(unclipped) > 1e-3, "the test needs gradients larger than the clip"
    clipped = step_norms(1e-3)
    assert len(clipped) == 4
    assert all(n <= 1e-3 * (1 + 1e-4) for n in clipped), clipped


def test_kl_controller_is_updated_once_with_the_mean_sequence_kl_and_the_batch_size():
    class Recording(FixedKLController):
        def __init__(self) -> None:
            super().__init__(0.1)
            self.calls: list[tuple[float, int]] = []

        def update(self, current_kl: float, n_steps: int) -> None:
            self.calls.append((current_kl, n_steps))

    policy = tiny_llama()
    head = ValueHead(HIDDEN)
    controller = Recording()
    stats = ppo_step(
        policy,
        head,
        tiny_llama(seed=1),  # a different reference, so the KL is not 0
        make_optimizer(policy, head),
        hand_rollout(),
        PPOConfig(ppo_epochs=1, minibatch_size=4),
        controller,
    )
    assert controller.calls == [(stats["objective/kl"], 4)]
    assert stats["objective/kl"] != 0.0


def test_reusing_the_scoring_forward_for_the_first_minibatch_changes_nothing(monkeypatch):
    def trained(reuse: bool) -> dict[str, torch.Tensor]:
        policy = tiny_llama()
        head = ValueHead(HIDDEN)
        torch.nn.init.normal_(head.linear.weight)  # non-zero, so the value loss has gradients
        optimizer = torch.optim.SGD([*policy.parameters(), *head.parameters()], lr=0.1)
        score = ppo_module.score_rollout
        if not reuse:  # score without tracking rows: the first minibatch runs its own forward
            monkeypatch.setattr(ppo_module, "score_rollout", lambda *a: score(*a[:6]))
        config = PPOConfig(ppo_epochs=2, minibatch_size=2, whiten_advantages=False)
        ppo_step(
            policy, head, tiny_llama(1), optimizer, hand_rollout(), config, FixedKLController(0.1)
        )
        monkeypatch.setattr(ppo_module, "score_rollout", score)
        return {**policy.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}

    reused, recomputed = trained(reuse=True), trained(reuse=False)
    assert any(not torch.equal(v, tiny_llama().state_dict().get(k, v)) for k, v in reused.items())
    for key, value in reused.items():
        torch.testing.assert_close(value, recomputed[key], atol=1e-6, rtol=1e-5, msg=key)


def test_the_policy_tokenizer_pads_with_a_token_that_is_not_eos(cache_dir):
    # With pad = EOS, padding after a short answer would read as the answer ending again.
    tokenizer = load_tokenizer(cache_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"  # what the chat template ends a turn with
