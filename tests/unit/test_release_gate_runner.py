"""The release stage's gate (services/trainer/release/gate.py) on tiny policies in a real store:
what it records, which candidates it refuses, and that an incumbent is sampled once."""

import copy

import pytest
import torch

from rlhf.algorithms.release_gate import GateTolerance
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.clients import RewardUnavailable, Scores
from rlhf.models import TINY, load_base_policy, load_tokenizer, policy_checkpoint_files
from services.trainer.release.gate import ReleaseGate


@pytest.fixture
def parts(tmp_path, cache_dir):
    store = CheckpointStore(tmp_path / "checkpoints")
    base = load_base_policy(TINY, cache_dir)
    store.write(POLICY, *policy_checkpoint_files(base))  # v1: the base model's weights
    calls = []

    def score(prompts, texts):
        calls.append(len(texts))
        return Scores([0.0] * len(texts), 2)

    def gate(tolerance=GateTolerance(), scorer=score, dtype=torch.float32):
        return ReleaseGate(
            store,
            lambda: load_tokenizer(cache_dir),
            lambda: load_base_policy(TINY, cache_dir),
            lambda: load_base_policy(TINY, cache_dir),
            scorer,
            ("Say hello.", "Count to three."),
            2,
            8,
            tolerance,
            dtype,
        )

    return store, base, gate, calls


def test_a_policy_like_the_incumbent_passes_and_both_are_scored_together(parts):
    store, base, gate, calls = parts
    store.write(POLICY, *policy_checkpoint_files(base))  # v2: the same weights
    outcome = gate().run(1, 2)
    assert outcome["passed"] and outcome["failed"] == []
    assert outcome["summary"] == "v2 passed the gate against v1: no regression"
    assert calls == [8]  # 2 prompts x 2 answers, for both policies, in one call
    assert outcome["reward_model_version"] == 2 and outcome["candidate"]["reward_scored"]
    assert outcome["candidate"]["length"] == outcome["incumbent"]["length"]


def test_in_bfloat16_both_policies_and_the_reference_run_in_it_alike(parts):
    store, base, gate, calls = parts
    store.write(POLICY, *policy_checkpoint_files(base))  # v2: the same weights
    runner = gate(dtype=torch.bfloat16)
    sampled = []
    runner.run(1, 1)  # builds the sampler (and measures v1 once)
    original = runner._sampler.answers
    runner._sampler.answers = lambda policy: sampled.append(policy.dtype) or original(policy)
    outcome = runner.run(1, 2)
    assert outcome["passed"] and sampled == [torch.bfloat16]
    assert runner._sampler.reference.dtype == torch.bfloat16
    # The same weights as the reference, in the same dtype: no divergence, the same answers.
    assert outcome["candidate"]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert outcome["candidate"]["length"] == outcome["incumbent"]["length"]


def test_a_candidate_beyond_the_kl_cap_is_refused_and_the_incumbent_sampled_once(parts):
    store, base, gate, calls = parts
    sharper = copy.deepcopy(base)
    with torch.no_grad():
        sharper.lm_head.weight.mul_(30.0)
    store.write(POLICY, *policy_checkpoint_files(sharper))  # v2: far from the reference
    store.write(POLICY, *policy_checkpoint_files(base))  # v3
    runner = gate(GateTolerance(repetition=1.0, max_kl=20.0))  # sharper also repeats itself
    refused = runner.run(1, 2)
    assert not refused["passed"] and refused["failed"] == ["kl"]
    assert refused["summary"].startswith("v2 refused by the gate against v1: kl:")
    sampled = []
    original = runner._sampler.answers
    runner._sampler.answers = lambda policy: sampled.append(policy) or original(policy)
    assert runner.run(1, 3)["passed"]
    assert len(sampled) == 1  # v3 only: v1's answers were kept


def test_an_unloadable_candidate_is_refused_and_an_unloadable_incumbent_not_compared(parts):
    store, base, gate, calls = parts
    store.write(POLICY, {"model.safetensors": {"w": torch.zeros(2)}})  # v2: not a policy
    refused = gate().run(1, 2)
    assert not refused["passed"] and "cannot be loaded" in refused["summary"]
    store.write(POLICY, *policy_checkpoint_files(base))  # v3
    outcome = gate().run(7, 3)  # v7 is not in the store (pruned)
    assert outcome["passed"] and "not compared: v7 cannot be loaded" in outcome["summary"]
    assert calls == []


def test_without_the_reward_service_the_gate_decides_nothing(parts):
    store, base, gate, _ = parts
    store.write(POLICY, *policy_checkpoint_files(base))

    def down(prompts, texts):
        raise RewardUnavailable("UNAVAILABLE: connection refused")

    with pytest.raises(RewardUnavailable):
        gate(scorer=down).run(1, 2)
