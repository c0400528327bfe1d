"""Trainer state survives the trip through safetensors + JSON, and a resumed learner continues
exactly as the original would have: same next update, bit for bit (with and without LoRA)."""

import pytest
import torch

from rlhf.models import TINY, load_base_policy, load_tokenizer
from rlhf.training.online import LoraSettings, PPOLearner, RolloutSettings
from rlhf.training.ppo_config import PPOConfig
from rlhf.training.state import (
    load_optimizer_state,
    optimizer_state,
    pack_blobs,
    pack_messages,
    pack_strings,
    unpack_blobs,
    unpack_messages,
    unpack_strings,
)
from rlhf.v1 import events_pb2

PROMPTS = [[1, 2, 3], [4, 5]]


def _score(prompts, responses):
    # Longer answers score higher: a signal the update can act on.
    return [float(len(r)) / 10 for r in responses]


def _learner(cache_dir, rank=0):
    return PPOLearner(
        load_base_policy(TINY, cache_dir),
        load_base_policy(TINY, cache_dir),
        load_tokenizer(cache_dir),
        PPOConfig(minibatch_size=2, ppo_epochs=2, learning_rate=1e-3),
        RolloutSettings(max_new_tokens=8, seed=3),
        LoraSettings(rank=rank),
    )


def test_blobs_strings_and_messages_round_trip_including_empty_ones():
    blobs = [b"", b"abc", b"\x00\xff"]
    assert unpack_blobs("x", pack_blobs("x", blobs)) == blobs
    assert unpack_blobs("x", pack_blobs("x", [])) == []
    assert unpack_strings("s", pack_strings("s", ["é", "", "id-1"])) == ["é", "", "id-1"]
    events = [events_pb2.FeedbackEvent(event_id=f"e{i}") for i in range(3)]
    assert unpack_messages("m", pack_messages("m", events), events_pb2.FeedbackEvent) == events


def test_inconsistent_blob_lengths_are_refused():
    tensors = pack_blobs("x", [b"abc"])
    tensors["x.lengths"] = torch.tensor([2])
    with pytest.raises(ValueError, match="lengths cover"):
        unpack_blobs("x", tensors)


def test_optimizer_state_round_trips():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.tensor([1.0, -2.0, 3.0])
    optimizer.step()
    tensors, meta = optimizer_state(optimizer)

    other = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    load_optimizer_state(other, tensors, meta)
    state = other.state_dict()
    assert state["param_groups"][0]["lr"] == 0.1
    assert torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert float(state["state"][0]["step"]) == 1.0


@pytest.mark.parametrize("rank", [0, 4])
def test_a_resumed_learner_makes_the_same_next_update(cache_dir, rank):
    original = _learner(cache_dir, rank)
    original.iterate(PROMPTS, _score)
    tensors, json_files = original.state_files()
    policy_weights = {k: v.clone() for k, v in original.policy.state_dict().items()}

    resumed = _learner(cache_dir, rank)
    if rank == 0:  # the policy weights travel in the policy checkpoint, not in the state
        resumed.policy.load_state_dict(policy_weights)
    resumed.load_state(tensors, json_files)
    assert resumed.updates == 1
    assert resumed.kl_controller.value == original.kl_controller.value

    expected = original.iterate(PROMPTS, _score)
    assert resumed.iterate(PROMPTS, _score) == expected
    for (name, a), b in zip(
        original.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_state_saved_with_another_lora_rank_is_refused(cache_dir):
    tensors, json_files = _learner(cache_dir, rank=4).state_files()
    with pytest.raises(ValueError, match="LoRA rank 4"):
        _learner(cache_dir, rank=0).load_state(tensors, json_files)


def test_lora_trains_only_the_adapter_and_value_head_and_exports_merged_weights(cache_dir):
    learner = _learner(cache_dir, rank=4)
    full = sum(p.numel() for p in load_base_policy(TINY, cache_dir).parameters())
    assert 0 < learner.trainable_parameters() < full / 50
    frozen = {n: p.clone() for n, p in learner.policy.named_parameters() if "lora_" not in n}
    for _ in range(3):
        learner.iterate(PROMPTS, _score)
    for name, param in learner.policy.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), f"{name} moved without being trainable"

    merged = learner.export_policy()
    assert not any("lora" in name for name in merged.state_dict())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = learner.policy(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        untrained = load_base_policy(TINY, cache_dir)(input_ids=ids).logits
        assert not torch.allclose(expected, untrained, atol=1e-5), "the adapter never moved"
    assert learner.policy.peft_config, "exporting must not unload the adapter being trained"
