"""Trainer state survives the trip through safetensors + JSON, and a resumed learner continues
exactly as the original would have: same next update, bit for bit (with and without LoRA, with
ppo and grpo); a state saved by another algorithm is not mixed in."""

import pytest
import torch

from rlhf.models import TINY, load_base_policy, load_tokenizer
from rlhf.training import Interrupted
from rlhf.training.online import (
    LEARNER_FILE,
    VALUE_HEAD_FILE,
    LoraSettings,
    PPOLearner,
    RolloutSettings,
)
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


def _learner(cache_dir, rank=0, algorithm="ppo"):
    return PPOLearner(
        load_base_policy(TINY, cache_dir),
        load_base_policy(TINY, cache_dir),
        load_tokenizer(cache_dir),
        PPOConfig(
            minibatch_size=2, ppo_epochs=2, learning_rate=1e-3, algorithm=algorithm, group_size=3
        ),
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


@pytest.mark.parametrize(("rank", "algorithm"), [(0, "ppo"), (4, "ppo"), (0, "grpo")])
def test_a_resumed_learner_makes_the_same_next_update(cache_dir, rank, algorithm):
    original = _learner(cache_dir, rank, algorithm)
    original.iterate(PROMPTS, _score)
    tensors, json_files = original.state_files()
    policy_weights = {k: v.clone() for k, v in original.policy.state_dict().items()}

    resumed = _learner(cache_dir, rank, algorithm)
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


def test_state_saved_by_another_algorithm_is_refused_by_the_learner(cache_dir):
    tensors, json_files = _learner(cache_dir).state_files()
    assert json_files[LEARNER_FILE]["algorithm"] == "ppo" and VALUE_HEAD_FILE in tensors
    with pytest.raises(ValueError, match="saved by ppo, this trainer runs rloo"):
        _learner(cache_dir, algorithm="rloo").load_state(tensors, json_files)
    tensors, json_files = _learner(cache_dir, algorithm="rloo").state_files()
    assert VALUE_HEAD_FILE not in tensors  # no critic, nothing of one saved
    with pytest.raises(ValueError, match="saved by rloo, this trainer runs ppo"):
        _learner(cache_dir).load_state(tensors, json_files)


def test_a_grpo_iteration_samples_a_seeded_group_per_prompt_and_trains_no_value_head(cache_dir):
    learner = _learner(cache_dir, algorithm="grpo")
    assert learner.value_head is None
    # Every optimised parameter is the policy's: nothing of a critic.
    policy_params = {id(p) for p in learner.policy.parameters()}
    assert all(id(p) in policy_params for p in learner.optimizer.param_groups[0]["params"])
    seen = []

    def score(prompts, responses):
        seen.append((prompts, responses))
        return _score(prompts, responses)

    stats = learner.iterate(PROMPTS, score, prompt_texts=["first", "second"])
    [(prompts, responses)] = seen
    # Group-major: the three answers to a prompt are consecutive rows.
    assert prompts == ["first"] * 3 + ["second"] * 3
    assert len(set(responses)) > 1, "each answer of a group is its own draw"
    assert {"reward_std", "frac_reward_zero_std"} <= stats.keys()
    # Seeded by their place in the global batch: a new learner draws the same answers.
    again = []
    _learner(cache_dir, algorithm="grpo").iterate(
        PROMPTS, lambda p, r: again.append(r) or _score(p, r), prompt_texts=["a", "b"]
    )
    assert again == [responses]


def test_a_stop_in_the_rollouts_changes_nothing_and_the_learner_goes_on(cache_dir):
    learner = _learner(cache_dir)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    with pytest.raises(Interrupted, match="rollouts given up on stop after 0 decoding steps"):
        learner.iterate(PROMPTS, _score, stopping=lambda: True)
    assert learner.updates == 0
    for name, weight in learner.export_policy().state_dict().items():
        assert torch.equal(weight, before[name]), name
    learner.iterate(PROMPTS, _score)
    assert learner.updates == 1


def test_a_learner_holding_part_of_an_update_given_up_on_stop_refuses_to_export_it(cache_dir):
    """Stopped after the update's first minibatch step: the weights and moments hold a part of
    an update, which must never reach a checkpoint; the learner refuses to export or go on."""
    learner = _learner(cache_dir)

    def after_a_minibatch() -> bool:
        return bool(learner.optimizer.state)  # the optimizer has taken a step

    with pytest.raises(Interrupted, match="after 1 of 2 minibatch steps"):
        learner.iterate(PROMPTS, _score, stopping=after_a_minibatch)
    assert learner.updates == 0
    for refused in (learner.export_policy, learner.state_files):
        with pytest.raises(Interrupted, match="holds part of an update"):
            refused()
    with pytest.raises(Interrupted, match="holds part of an update"):
        learner.iterate(PROMPTS, _score)
    # Nor a rollback queued before the stop (data parallel, the rebase is a collective: every
    # rank refuses it before one).
    with pytest.raises(Interrupted, match="holds part of an update"):
        learner.rebase(load_base_policy(TINY, cache_dir))


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


@pytest.mark.parametrize(("saved_by", "resumed_by"), [("ppo", "grpo"), ("rloo", "ppo")])
def test_switching_algorithms_on_resume_keeps_the_policy_and_intake_and_starts_a_fresh_learner(
    cache_dir, tmp_path, saved_by, resumed_by
):
    """The ppo stage's resume with RLHF_PPO_ALGORITHM changed since the checkpoint: handled,
    not mixed (the optimizer covered a value head or not) and not refused."""
    from rlhf.checkpoints import POLICY, CheckpointStore
    from services.trainer.ppo.intake import QUEUED_GENERATIONS
    from services.trainer.ppo.state import resume, write_checkpoint
    from tests.unit.test_training_loop import _intake_with

    store = CheckpointStore(tmp_path)
    saved = _learner(cache_dir, algorithm=saved_by)
    saved.iterate(PROMPTS, _score)
    intake = _intake_with(["a", "b"])  # two joined prompts queued, not trained on yet
    intake.offsets = {("rlhf.feedback.v1", 0): 41}
    write_checkpoint(store, saved, intake.snapshot(), 0, 0, {"algorithm": saved_by})
    weights = {k: v.clone() for k, v in saved.policy.state_dict().items()}

    def maker(algorithm):
        def make_learner(policy):
            learner = _learner(cache_dir, algorithm=algorithm)
            learner.rebase(policy)
            return learner

        return make_learner

    def load_base():
        return load_base_policy(TINY, cache_dir)

    switched = resume(store, load_base, maker(resumed_by), lora_rank=0, algorithm=resumed_by)
    assert switched.policy_version == store.latest_version(POLICY) == 1
    assert switched.learner.updates == 0  # fresh: no moments or KL state of the other estimator
    assert switched.learner.config.algorithm == resumed_by
    assert (switched.learner.value_head is None) == (resumed_by != "ppo")
    for name, value in switched.learner.policy.state_dict().items():
        assert torch.equal(value, weights[name]), name  # what the users taught it is kept
    assert switched.intake is not None and switched.intake.offsets == intake.offsets
    queued = switched.intake.messages[QUEUED_GENERATIONS]
    assert [g.generation_id for g in queued] == ["a", "b"]

    same = resume(store, load_base, maker(saved_by), lora_rank=0, algorithm=saved_by)
    assert same.learner.updates == 1  # the state itself is loaded when the algorithm matches
