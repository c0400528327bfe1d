"""The LM head in MKL's packed GEMM layout while decoding in float32 (`rlhf.models.packed_head`):
the same logits up to summation order, the plain path wherever packing would not pay or could
not be right, the head as it was afterwards, and the trainer's float32 rollouts decoding
through it."""

from __future__ import annotations

import pytest
import torch

from rlhf import decoding, models
from rlhf.models import TINY, load_base_policy, load_tokenizer, packed_head
from rlhf.training.online import LoraSettings, PPOLearner, RolloutSettings
from rlhf.training.ppo_config import PPOConfig

pytestmark = pytest.mark.skipif(
    not models.mkl_packed_gemm(), reason="this torch build has no MKL packed GEMM"
)

ROWS = 8


@pytest.fixture
def policy(cache_dir):
    return load_base_policy(TINY, cache_dir).eval()


@pytest.fixture
def packed_calls(monkeypatch):
    """Row counts of every packed head multiplication."""
    calls: list[int] = []
    real = torch.ops.mkl._mkl_linear

    def spy(hidden, *args):
        calls.append(hidden.shape[0])
        return real(hidden, *args)

    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", spy)
    return calls


def _hidden(policy, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, policy.config.hidden_size, generator=generator)


@pytest.mark.parametrize("count", [ROWS, ROWS - 1, ROWS // 2 + 1])
def test_the_packed_head_gives_the_plain_heads_logits(policy, packed_calls, count):
    hidden = _hidden(policy, count)
    head = policy.get_output_embeddings()
    with torch.inference_mode():
        plain = head(hidden)
        with packed_head(policy, ROWS) as packed:
            assert packed
            logits = head(hidden)
    assert packed_calls == [ROWS]  # fewer rows are padded up to the pack's
    assert logits.shape == plain.shape == (count, 1, policy.config.vocab_size)
    assert torch.allclose(logits, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("count", [ROWS + 1, ROWS // 2, 1])
def test_more_rows_or_too_few_take_the_plain_path(policy, packed_calls, count):
    hidden = _hidden(policy, count)
    head = policy.get_output_embeddings()
    with torch.inference_mode():
        plain = head(hidden)
        with packed_head(policy, ROWS):
            logits = head(hidden)
    assert packed_calls == []
    assert torch.equal(logits, plain)


def test_a_call_recording_gradients_takes_the_plain_path_and_trains_the_head(policy, packed_calls):
    head = policy.get_output_embeddings()
    with packed_head(policy, ROWS):
        head(_hidden(policy, ROWS)).sum().backward()
    assert packed_calls == []
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_the_head_is_itself_again_after_the_block_even_when_it_failed(policy, packed_calls):
    head = policy.get_output_embeddings()
    with pytest.raises(RuntimeError, match="decode failed"), packed_head(policy, ROWS):
        assert "forward" in vars(head)
        raise RuntimeError("decode failed")
    assert "forward" not in vars(head)
    with torch.inference_mode():
        head(_hidden(policy, ROWS))
    assert packed_calls == []


def test_only_a_float32_head_with_mkl_and_several_rows_is_packed(policy, monkeypatch):
    with packed_head(policy.to(torch.bfloat16), ROWS) as packed:
        assert not packed
    policy.to(torch.float32)
    with packed_head(policy, 1) as packed:
        assert not packed
    with packed_head(torch.nn.Linear(4, 4, bias=False), ROWS) as packed:
        assert not packed  # no LM head to find
    monkeypatch.setattr(models, "mkl_packed_gemm", lambda: False)
    with packed_head(policy, ROWS) as packed:
        assert not packed
    assert "forward" not in vars(policy.get_output_embeddings())


def test_decoding_through_the_packed_head_samples_the_same_answers(policy, cache_dir, packed_calls):
    tokenizer = load_tokenizer(cache_dir)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]] * 2 + [[10, 11]] * 2
    params = [decoding.Sampling(max_new_tokens=6, temperature=0.7, seed=row) for row in range(8)]
    eos, pad = {tokenizer.eos_token_id}, tokenizer.pad_token_id
    plain = decoding.generate(policy, prompts, params, eos, pad)
    with packed_head(policy, len(prompts)):
        packed = decoding.generate(policy, prompts, params, eos, pad)
    assert packed_calls  # the prefill and the decode steps multiplied through the pack
    for a, b in zip(plain, packed, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


@pytest.mark.parametrize(
    ("dtype", "lora_rank", "packs"),
    [("float32", 0, True), ("float32", 4, True), ("bfloat16", 0, False)],
)
def test_the_trainers_float32_rollouts_decode_through_the_packed_head(
    cache_dir, packed_calls, dtype, lora_rank, packs
):
    learner = PPOLearner(
        load_base_policy(TINY, cache_dir),
        load_base_policy(TINY, cache_dir),
        load_tokenizer(cache_dir),
        PPOConfig(dtype=dtype, minibatch_size=2, ppo_epochs=1, learning_rate=1e-3),
        RolloutSettings(max_new_tokens=8, seed=3),
        LoraSettings(rank=lora_rank),
    )
    completions = learner.sample([[1, 2, 3], [4, 5], [6, 7, 8], [9]])
    assert len(completions) == 4
    # bfloat16 rollouts decode on a bfloat16 copy, whose head the plain GEMM serves well.
    assert bool(packed_calls) is packs
    assert all(rows == 4 for rows in packed_calls)
    assert "forward" not in vars(learner.policy.get_output_embeddings())
