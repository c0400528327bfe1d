"""Mixed precision in the PPO step (RLHF_PPO_DTYPE): a bfloat16 step is the float32 step within
bfloat16's rounding, an unchanged policy's importance ratio stays 1, and everything the
optimizer and the checkpoints see stays float32.

Tolerances, on the tiny random Llama (hidden 32, 2 layers) and the hand-built rollout (measured
differences in brackets, so the margins are visible):
- per-token logprobs, values, entropy: within 5e-3 of float32 [logprobs 9e-4]; the importance
  ratio of an unchanged policy, the update's minibatch forward against the scoring pass's old
  logprobs: within 5e-3 of 1 (bfloat16 keeps 8 bits of mantissa, ~4e-3 relative per rounding);
- the step's losses, KL, approx-KL, ratio and entropy statistics: within 2e-3 absolute of the
  float32 step's [KL 4e-4, policy loss 2e-4];
- the weights' change after a step (SGD, so the change is the gradients'): cosine similarity
  above 0.999 with the float32 step's change [0.99999], its norm within 1% [0.03%].
"""

import copy

import pytest
import torch
from torch.nn import functional as F

from rlhf import decoding
from rlhf.algorithms.ppo import FixedKLController
from rlhf.config import ConfigError
from rlhf.models import (
    TINY,
    WEIGHTS_FILE,
    load_base_policy,
    load_tokenizer,
    policy_checkpoint_files,
    serving_dtype,
)
from rlhf.training import online
from rlhf.training.online import OPTIMIZER_FILE, LoraSettings, PPOLearner, RolloutSettings
from rlhf.training.ppo import (
    ValueHead,
    cast_frozen_linears,
    compute_precision,
    forward_policy,
    ppo_step,
    score_rollout,
)
from rlhf.training.ppo_config import PPOConfig
from tests.unit.test_ppo_step import HIDDEN, hand_rollout, tiny_llama

LOGPROB_TOL = 5e-3
STAT_TOL = 2e-3


def test_the_dtype_setting_resolves_like_serving_and_refuses_unknown_names():
    assert PPOConfig(dtype="float32").compute_dtype() is torch.float32
    assert PPOConfig(dtype="bfloat16").compute_dtype() is torch.bfloat16
    assert PPOConfig().compute_dtype() is serving_dtype("auto")
    with pytest.raises(ConfigError, match="RLHF_PPO_DTYPE='float16'"):
        PPOConfig(dtype="float16").validate()


def test_the_width_multiple_is_16_for_bf16_passes_1_for_float32_or_as_set():
    assert PPOConfig(dtype="bfloat16").width_multiple() == 16
    assert PPOConfig(dtype="float32").width_multiple() == 1
    assert PPOConfig(dtype="float32", pad_multiple=8).width_multiple() == 8
    with pytest.raises(ConfigError, match="RLHF_PPO_PAD_MULTIPLE"):
        PPOConfig(pad_multiple=-1).validate()


def _policy_head_and_pass():
    """The tiny policy, a value head with non-zero weights, a rollout, and forward_policy's
    positional arguments for it (temperature 0.7)."""
    policy, head = tiny_llama(), ValueHead(HIDDEN)
    torch.nn.init.normal_(head.linear.weight, std=0.1)
    rollout = hand_rollout()
    return (
        policy,
        head,
        rollout,
        (rollout.input_ids, rollout.attention_mask, rollout.prompt_width, 0.7),
    )


def test_bf16_forward_runs_in_bf16_and_returns_fp32_close_to_fp32():
    policy, head, rollout, args = _policy_head_and_pass()
    with torch.no_grad():
        full = forward_policy(policy, head, *args, dtype=torch.float32)
        half = forward_policy(policy, head, *args, dtype=torch.bfloat16)
    mask = rollout.response_mask
    for name, exact, mixed in zip(("logprobs", "values", "entropy"), full, half, strict=True):
        assert mixed.dtype == torch.float32, name
        # Not the same numbers: the matmuls really ran in bfloat16.
        assert not torch.equal(exact[mask], mixed[mask]), name
        torch.testing.assert_close(mixed[mask], exact[mask], atol=LOGPROB_TOL, rtol=0, msg=name)


def test_in_bf16_on_the_cpu_attention_runs_in_float32_and_the_rest_in_bf16():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=generator) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=generator) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    half = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*(t.detach().float() for t in half), attn_mask=mask)
    with compute_precision(torch.bfloat16, torch.device("cpu")):
        out = F.scaled_dot_product_attention(*half, attn_mask=mask)
        matmul = half[0] @ half[1].transpose(-1, -2).float()  # autocast still casts the rest
        floating_mask = torch.zeros(2, 1, 6, 6, dtype=torch.bfloat16)
        positional = F.scaled_dot_product_attention(*half, floating_mask)
    assert out.dtype == torch.float32 and matmul.dtype == torch.bfloat16
    torch.testing.assert_close(out, exact, atol=1e-6, rtol=1e-5)
    assert positional.dtype == torch.float32
    out.sum().backward()  # gradients come back in the inputs' own dtype
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in half)
    # Outside the context nothing changes.
    assert F.scaled_dot_product_attention(*half, attn_mask=mask).dtype == torch.bfloat16
    with compute_precision(torch.float32, torch.device("cpu")):
        assert F.scaled_dot_product_attention(*half, attn_mask=mask).dtype == torch.bfloat16


def test_a_value_head_called_inside_an_open_bf16_context_still_computes_in_float32():
    policy, head, rollout, args = _policy_head_and_pass()
    with torch.no_grad():
        alone = forward_policy(policy, head, *args, dtype=torch.bfloat16)
        with compute_precision(torch.bfloat16, torch.device("cpu")):  # as the scoring pass does
            nested = forward_policy(policy, head, *args, dtype=torch.bfloat16)
    for name, a, b in zip(("logprobs", "values", "entropy"), alone, nested, strict=True):
        assert torch.equal(a, b), name


def test_an_unchanged_policys_importance_ratio_is_1_in_bf16():
    """The update's forward (a minibatch, with autograd) against the scoring pass's old
    logprobs (the whole batch, without): different batches, same weights."""
    policy = tiny_llama()
    rollout = hand_rollout()
    config = PPOConfig(dtype="bfloat16", temperature=0.7)
    scored, _ = score_rollout(policy, ValueHead(HIDDEN), tiny_llama(1), rollout, config, 0.1)
    rows = torch.tensor([2, 0])
    logprobs, _, _ = forward_policy(
        policy,
        None,
        rollout.input_ids[rows],
        rollout.attention_mask[rows],
        rollout.prompt_width,
        config.temperature,
        dtype=torch.bfloat16,
    )
    mask = rollout.response_mask[rows]
    ratio = torch.exp(logprobs - scored.old_logprobs[rows])[mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=LOGPROB_TOL, rtol=0)

    # And the step's own statistic with weights that do not move (learning rate 0).
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    stats = ppo_step(
        policy,
        None,
        tiny_llama(1),
        optimizer,
        hand_rollout(),
        PPOConfig(dtype="bfloat16", algorithm="grpo", group_size=2, ppo_epochs=2, minibatch_size=2),
        FixedKLController(0.1),
    )
    assert stats["val/ratio"] == pytest.approx(1.0, abs=LOGPROB_TOL)
    assert stats["policy/clipfrac"] == 0.0


def _step(dtype: str, algorithm: str = "ppo"):
    """One step from the same start in `dtype`: (stats, weight change per parameter)."""
    policy = tiny_llama()
    head = None
    if algorithm == "ppo":
        head = ValueHead(HIDDEN)
        torch.nn.init.normal_(head.linear.weight, std=0.1)  # so the value loss has gradients
    start = copy.deepcopy(policy.state_dict())
    params = [*policy.parameters(), *([] if head is None else head.parameters())]
    optimizer = torch.optim.SGD(params, lr=0.05)
    config = PPOConfig(
        dtype=dtype,
        algorithm=algorithm,
        group_size=2,
        ppo_epochs=2,
        minibatch_size=2,
        temperature=0.7,
    )
    stats = ppo_step(
        policy, head, tiny_llama(1), optimizer, hand_rollout(), config, FixedKLController(0.1)
    )
    for name, param in policy.named_parameters():
        assert param.dtype == torch.float32, f"{name}: master weights must stay float32"
        assert param.grad is None or param.grad.dtype == torch.float32, name
    change = {k: v - start[k] for k, v in policy.state_dict().items()}
    return stats, change


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_bf16_step_matches_the_fp32_step(algorithm):
    full_stats, full_change = _step("float32", algorithm)
    half_stats, half_change = _step("bfloat16", algorithm)

    keys = ["objective/kl", "loss/policy", "policy/approxkl", "val/ratio", "policy/entropy"]
    if algorithm == "ppo":
        keys.append("loss/value")
    for key in keys:
        assert half_stats[key] == pytest.approx(full_stats[key], abs=STAT_TOL), key
    # The KL is not trivially 0 here: the reference is another model.
    assert abs(full_stats["objective/kl"]) > 10 * STAT_TOL, full_stats["objective/kl"]

    full = torch.cat([v.flatten() for v in full_change.values()])
    half = torch.cat([v.flatten() for v in half_change.values()])
    assert full.norm() > 0 and not torch.equal(full, half)
    cosine = torch.nn.functional.cosine_similarity(full, half, dim=0)
    assert cosine > 0.999, cosine
    assert half.norm() == pytest.approx(full.norm().item(), rel=0.01)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_bf16_learner_decodes_on_bf16_weights_and_keeps_float32_weights_and_state(
    cache_dir, monkeypatch, lora_rank
):
    """The trainer's own loop in bfloat16, with and without LoRA: rollouts decode on a
    bfloat16 copy and are importance-weighted for it, the update moves the float32 weights
    (only the adapter with LoRA), and the checkpoint files (policy, optimizer moments) are
    float32 as before."""
    tokenizer = load_tokenizer(cache_dir)
    learner = PPOLearner(
        load_base_policy(TINY, cache_dir),
        load_base_policy(TINY, cache_dir),
        tokenizer,
        PPOConfig(dtype="bfloat16", minibatch_size=2, ppo_epochs=1, learning_rate=1e-3),
        RolloutSettings(max_new_tokens=8, seed=3),
        LoraSettings(rank=lora_rank),
    )
    decoded_in: list[torch.dtype] = []
    generate = decoding.generate

    def spy(model, *args, **kwargs):
        decoded_in.append(model.dtype)
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(decoding, "generate", spy)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}

    widths: list[int] = []
    step = online.ppo_step

    def record_width(policy, head, reference, optimizer, rollout, *args, **kwargs):
        widths.append(rollout.input_ids.shape[1])
        return step(policy, head, reference, optimizer, rollout, *args, **kwargs)

    monkeypatch.setattr(online, "ppo_step", record_width)

    stats = learner.iterate([[1, 2, 3], [4, 5]], lambda p, r: [len(x) / 10 for x in r])

    assert decoded_in == [torch.bfloat16]
    assert len(widths) == 1 and widths[0] % 16 == 0  # RLHF_PPO_PAD_MULTIPLE, auto
    assert stats["response/length"] > 0
    # Sampled on bfloat16 weights, weighted by pi_old / pi_decoded: close to 1, not exactly.
    assert stats["policy/is_weight_mean"] == pytest.approx(1.0, abs=LOGPROB_TOL)
    assert stats["policy/is_weight_mean"] != 1.0
    moved = {k for k, v in learner.policy.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(("lora_" in k) == bool(lora_rank) for k in moved), sorted(moved)
    weights, _ = policy_checkpoint_files(learner.export_policy())
    assert {t.dtype for t in weights[WEIGHTS_FILE].values()} == {torch.float32}
    tensors, _ = learner.state_files()
    assert {t.dtype for t in tensors[OPTIMIZER_FILE].values() if t.is_floating_point()} == {
        torch.float32
    }
    # The frozen reference keeps its linear layers in bfloat16 (cast_frozen_linears).
    reference = learner.reference
    assert reference.lm_head.weight.dtype == torch.bfloat16
    assert reference.get_input_embeddings().weight.dtype == torch.float32


def test_a_frozen_models_linears_stored_in_bf16_compute_the_same_bf16_passes():
    model = tiny_llama(1).requires_grad_(False)
    rollout = hand_rollout()
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_width, 0.7)
    with torch.no_grad():
        before = forward_policy(model, None, *args, dtype=torch.bfloat16)
        cast_frozen_linears(model, torch.bfloat16)
        after = forward_policy(model, None, *args, dtype=torch.bfloat16)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    untouched = tiny_llama(1).requires_grad_(False)
    assert cast_frozen_linears(untouched, torch.float32).lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="frozen"):
        cast_frozen_linears(tiny_llama(1), torch.bfloat16)


def test_a_float32_learner_decodes_on_its_own_weights_and_does_not_weight_its_rollouts(
    cache_dir, monkeypatch
):
    learner = PPOLearner(
        load_base_policy(TINY, cache_dir),
        load_base_policy(TINY, cache_dir),
        load_tokenizer(cache_dir),
        PPOConfig(dtype="float32", minibatch_size=2, ppo_epochs=1, learning_rate=1e-3),
        RolloutSettings(max_new_tokens=8, seed=3),
    )
    decoded_on: list[torch.nn.Module] = []
    generate = decoding.generate

    def spy(model, *args, **kwargs):
        decoded_on.append(model)
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(decoding, "generate", spy)
    stats = learner.iterate([[1, 2, 3], [4, 5]], lambda p, r: [len(x) / 10 for x in r])
    assert decoded_on == [learner.policy]
    assert stats["policy/is_weight_mean"] == 1.0 and stats["policy/is_capped_frac"] == 0.0
