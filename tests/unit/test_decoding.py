import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf import decoding
from rlhf.decoding import Sampling, filter_logits, generate
from rlhf.training.ppo import build_rollout, forward_policy

PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_seeded_row_is_reproducible_whatever_the_batch(model):
    alone = generate(model, [[5, 6, 7]], [Sampling(16, 1.0, seed=42)], {EOS}, PAD)[0]
    batched = generate(
        model,
        [[9, 9, 9, 9, 9, 9], [5, 6, 7]],
        [Sampling(16, 1.0, seed=1), Sampling(16, 1.0, seed=42)],
        {EOS},
        PAD,
    )[1]
    assert batched.token_ids == alone.token_ids
    assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    other_seed = generate(model, [[5, 6, 7]], [Sampling(16, 1.0, seed=43)], {EOS}, PAD)[0]
    assert other_seed.token_ids != alone.token_ids


def test_greedy_left_padding_matches_unpadded(model):
    short = [11, 12]
    alone = generate(model, [short], [Sampling(8, 0.0)], {EOS}, PAD)[0]
    padded = generate(model, [[3] * 7, short], [Sampling(8, 0.0)] * 2, {EOS}, PAD)[1]
    assert padded.token_ids == alone.token_ids


def test_length_and_eos_finish_reasons(model):
    [out] = generate(model, [[5, 6]], [Sampling(5, 0.0)], set(), PAD)
    assert len(out.token_ids) == 5 and out.finish_reason == decoding.LENGTH
    first = out.token_ids[0]
    [ended] = generate(model, [[5, 6]], [Sampling(5, 0.0)], {first}, PAD)
    assert ended.token_ids == [first] and ended.finish_reason == decoding.EOS


def test_stop_check_ends_a_row(model):
    [out] = generate(
        model,
        [[5, 6]],
        [Sampling(10, 1.0, seed=3)],
        set(),
        PAD,
        stop_check=lambda r, t: len(t) == 3,
    )
    assert len(out.token_ids) == 3 and out.finish_reason == decoding.STOP


def test_sampled_logprobs_equal_the_trainers_recomputation(model):
    """The classic PPO pitfall: logprobs recomputed at a different temperature than sampling."""
    prompts = [[5, 6, 7], [8, 9]]
    params = [Sampling(12, 0.7, seed=s) for s in (1, 2)]
    completions = generate(model, prompts, params, {EOS}, PAD)
    rollout = build_rollout(prompts, [c.token_ids for c in completions], [0.0, 0.0], PAD, EOS)
    logprobs, _, _ = forward_policy(
        model, None, rollout.input_ids, rollout.attention_mask, rollout.prompt_width, 0.7
    )
    for row, completion in enumerate(completions):
        n = len(completion.token_ids)
        assert logprobs[row, :n].tolist() == pytest.approx(completion.logprobs, abs=1e-4)
    wrong_temperature, _, _ = forward_policy(
        model, None, rollout.input_ids, rollout.attention_mask, rollout.prompt_width, 1.0
    )
    assert not torch.allclose(wrong_temperature, logprobs, atol=1e-3)


def test_top_k_keeps_k_best():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0])
    kept = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [False, True, False, True]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, top_k=0, top_p=0.7)
    # 0.5 alone < 0.7, so the second token is needed; the third is not.
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.1)).tolist() == [True, False, False, False]


def test_empty_prompt_refused(model):
    with pytest.raises(ValueError):
        generate(model, [[]], [Sampling()], {EOS}, PAD)
