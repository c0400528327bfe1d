import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf import decoding
from rlhf.decoding import Sampling, filter_logits, generate
from rlhf.training import Interrupted
from rlhf.training.ppo import build_rollout, forward_policy
from tests.conftest import tiny_llama

PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


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


def test_a_stop_gives_the_whole_batch_up_between_decoding_steps(model):
    asked: list[bool] = []

    def after_three_steps() -> bool:
        asked.append(True)
        return len(asked) > 3

    params = [Sampling(20, 1.0, seed=1), Sampling(20, 1.0, seed=2)]
    with pytest.raises(Interrupted, match="after 3 decoding steps"):
        generate(model, [[5, 6], [7]], params, set(), PAD, stopping=after_three_steps)
    assert len(asked) == 4
    # Not stopping, the same rows decode to the end.
    done = generate(model, [[5, 6], [7]], params, set(), PAD, stopping=lambda: False)
    assert [len(c.token_ids) for c in done] == [20, 20]


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


def _alone(model, prompt, sampling):
    return generate(model, [prompt], [sampling], set(), PAD)[0]


def test_rows_join_a_running_batch_and_leave_it_with_their_own_answers(model):
    """Per-step batching: a row joining mid-flight, or outliving its batch-mates, samples
    exactly what it samples alone (seeded and greedy rows alike)."""
    first = decoding.Row([5, 6, 7], Sampling(20, 1.0, seed=11))
    short = decoding.Row([9, 9], Sampling(3, 0.0))  # leaves after 3 tokens
    late = decoding.Row([4, 3, 2, 1, 8, 8, 8, 8, 8], Sampling(6, 0.8, seed=5))
    batch = decoding.DecodeBatch(model, set(), PAD)
    assert batch.join([first, short]) == []
    finished = []
    for _ in range(2):
        finished += batch.step()
    assert finished == [short] and len(batch) == 1  # `short` left as soon as it ended
    assert batch.join([late]) == []  # a longer prompt than the running row's cache
    assert batch.width == len(late.prompt)
    while batch:
        finished += batch.step()
    assert finished == [short, late, first]
    for row in (first, short, late):
        alone = _alone(model, row.prompt, row.sampling)
        assert row.completion.token_ids == alone.token_ids
        assert row.completion.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert row.completion.finish_reason == decoding.LENGTH
    assert batch.width == 0  # every column was released


def test_dropped_row_leaves_and_the_others_continue(model):
    keep = decoding.Row([5, 6], Sampling(8, 0.0))
    gone = decoding.Row([7, 7, 7, 7], Sampling(8, 0.0))
    batch = decoding.DecodeBatch(model, set(), PAD)
    batch.join([gone, keep])
    batch.step()
    batch.drop([gone])
    assert batch.rows == [keep]
    while batch:
        batch.step()
    assert keep.completion.token_ids == _alone(model, keep.prompt, keep.sampling).token_ids
    assert len(gone.completion.token_ids) == 2


def test_row_finishing_at_its_first_token_never_enters_the_batch(model):
    row = decoding.Row([5, 6], Sampling(1, 0.0))
    batch = decoding.DecodeBatch(model, set(), PAD)
    assert batch.join([row]) == [row] and len(batch) == 0
    assert len(row.completion.token_ids) == 1


def test_bf16_copy_of_a_tied_policy_stays_tied(model):
    from rlhf.models import policy_in_dtype

    config = LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True})
    tied = LlamaForCausalLM(config).eval()
    copy = policy_in_dtype(tied, torch.bfloat16)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert copy.dtype is torch.bfloat16 and tied.dtype is torch.float32
    assert policy_in_dtype(tied, torch.float32) is tied


def test_rows_sharing_a_prompt_prefix_reuse_its_cache_and_answer_as_alone(model):
    template = [3, 4, 5, 6, 7, 8, 9, 10]  # say, a chat template's system prompt
    prefixes = decoding.PrefixCache(min_tokens=4)
    batch = decoding.DecodeBatch(model, set(), PAD, prefixes)
    rows = [
        decoding.Row(template + tail, Sampling(6, 1.0, seed=seed))
        for seed, tail in enumerate([[11, 12], [13], [14, 15, 16], [17, 18], [19]])
    ]
    batch.join(rows[:1])
    batch.step()
    batch.join(rows[1:2])  # shares the template with the last prefill: learnt, not reused yet
    assert prefixes.ids == template and prefixes.hits == 0
    batch.step()
    batch.join(rows[2:4])  # two rows with different tails, prefilled after the cached prefix
    batch.join(rows[4:])
    assert prefixes.hits == 3
    while batch:
        batch.step()
    for row in rows:
        alone = _alone(model, row.prompt, row.sampling)
        assert row.completion.token_ids == alone.token_ids
        assert row.completion.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    unrelated = decoding.Row([20, 21, 22, 23, 24], Sampling(3, 0.0))
    batch.join([unrelated])  # shares nothing with the prefix: a full prefill
    assert prefixes.hits == 3


def test_left_pad_rounds_the_width_up_with_masked_columns():
    ids, mask = decoding.left_pad([[5, 6, 7], [8]], PAD, multiple=4)
    assert ids.tolist() == [[PAD, 5, 6, 7], [PAD, PAD, PAD, 8]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    ids, mask = decoding.left_pad([[5, 6, 7, 8, 9]], PAD, multiple=4)
    assert ids.shape == (1, 8) and mask.sum() == 5


def _prefill_widths(model):
    """Records the width of every forward pass over more than one column (the prefills)."""
    widths = []

    def hook(_module, _args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            widths.append(kwargs["input_ids"].shape[1])

    return widths, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_padded_prefills_give_the_same_answers(model):
    """Prefill widths rounded up to 16 (joins, a running batch, a shared prefix) change no
    token and no logprob beyond rounding."""
    template = [3, 4, 5, 6, 7, 8, 9, 10]
    prompts = [template + [11, 12], [9, 9], template + [13], [4, 3, 2, 1, 8, 8, 8, 8, 8, 8]]
    samplings = [Sampling(6, 1.0, seed=seed) for seed in range(len(prompts))]

    def run(multiple):
        batch = decoding.DecodeBatch(
            model, set(), PAD, decoding.PrefixCache(min_tokens=4), width_multiple=multiple
        )
        rows = [decoding.Row(p, s) for p, s in zip(prompts, samplings, strict=True)]
        batch.join(rows[:2])
        batch.step()
        batch.join(rows[2:3])  # reuses the template's cache
        batch.step()
        batch.join(rows[3:])
        while batch:
            batch.step()
        return [row.completion for row in rows]

    widths, hook = _prefill_widths(model)
    try:
        padded = run(16)
    finally:
        hook.remove()
    assert widths and all(width % 16 == 0 for width in widths)
    for exact, wide in zip(run(1), padded, strict=True):
        assert wide.token_ids == exact.token_ids
        assert wide.logprobs == pytest.approx(exact.logprobs, abs=1e-5)


def test_a_bf16_model_pads_its_prefills_and_a_float32_one_does_not(model):
    from rlhf.models import policy_in_dtype

    bf16 = policy_in_dtype(model, torch.bfloat16)
    assert decoding.DecodeBatch(bf16, set(), PAD).width_multiple == 16
    assert decoding.DecodeBatch(model, set(), PAD).width_multiple == 1
    widths, hook = _prefill_widths(bf16)
    try:
        generate(bf16, [[5, 6, 7], [8, 9]], [Sampling(3, 0.0)] * 2, {EOS}, PAD)
    finally:
        hook.remove()
    assert widths == [16]
    with pytest.raises(ValueError, match="width_multiple"):
        decoding.DecodeBatch(model, set(), PAD, width_multiple=0)
