"""The whole loop on one machine: generate -> feedback -> trainer joins both -> PPO update ->
policy checkpoint published -> the generation service serves the new version.

Real broker, real gRPC servers over loopback, tiny random models, simulated users rating with
VADER sentiment.
"""

import random
import time

import grpc
import pytest

from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.models import TINY
from rlhf.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.feedback.config import FeedbackConfig
from services.feedback.main import FeedbackService
from services.generation.config import GenerationConfig
from services.generation.main import GenerationService
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from services.simulated_users.users import SimulatedUser, Tally
from services.trainer.ppo.service import PPOTrainerService
from tests.conftest import (
    API_KEY,
    ID_KEY,
    TENANT,
    channels_to,
    publish_reward_model,
    serve,
    trainer_config,
    wait_until,
)


@pytest.fixture
def platform(broker, cache_dir, tmp_path):
    """All four services in this process, sharing one checkpoint store."""
    store = tmp_path / "checkpoints"
    common = {"kafka_bootstrap": broker.bootstrap, "checkpoint_dir": store, "cache_dir": cache_dir}
    servers = {}
    servers["reward"] = serve(RewardService(RewardConfig(**common, reward_model=TINY)))
    servers["generation"] = serve(
        GenerationService(
            GenerationConfig(
                **common,
                policy_model=TINY,
                generation_id_key=ID_KEY,
                api_keys=(f"{TENANT}={API_KEY}",),
                http_port=0,
            )
        )
    )
    servers["feedback"] = serve(
        FeedbackService(
            FeedbackConfig(**common, generation_id_key=ID_KEY, api_keys=(f"{TENANT}={API_KEY}",))
        )
    )
    servers["trainer"] = serve(
        PPOTrainerService(
            trainer_config(
                common,
                RLHF_POLICY_MODEL=TINY,
                RLHF_REWARD_ADDRESS=f"127.0.0.1:{servers['reward'].port}",
                RLHF_TRAINER_GROUP="e2e-trainer",
                RLHF_KAFKA_MAX_POLL_INTERVAL_MS=4000,
                RLHF_PPO_BATCH_SIZE=2,
                RLHF_PPO_MINIBATCH_SIZE=2,
                RLHF_PPO_EPOCHS=2,
                RLHF_PPO_LEARNING_RATE=1e-3,
                RLHF_PPO_RESPONSE_TOKENS=8,
                RLHF_PUBLISH_EVERY_UPDATES=1,
            )
        )
    )
    channels = channels_to(servers)
    channels["bootstrap"], channels["store"] = broker.bootstrap, store
    yield channels, CheckpointStore(store)
    for name in ("trainer", "feedback", "generation", "reward"):
        channels[name].close()
    for name in ("trainer", "feedback", "generation", "reward"):
        servers[name].stop()


def _reward_model_served(channels) -> int:
    """Publish a reward model (PPO waits for one) and wait until the reward service serves it."""
    version = publish_reward_model(channels["bootstrap"], channels["store"])
    reward = reward_pb2_grpc.RewardServiceStub(channels["reward"])
    request = reward_pb2.GetModelInfoRequest()
    assert wait_until(lambda: reward.GetModelInfo(request).version == version, timeout=60)
    return version


def test_ppo_waits_for_a_trained_reward_model_and_says_why(platform):
    """Before any reward model is published, feedback is consumed and joined but PPO does not
    train on the untrained head's scores: no policy, and the status says what it waits for.
    Once a reward model is served, training starts and every update names its version."""
    channels, store = platform
    generation = generation_pb2_grpc.GenerationServiceStub(channels["generation"])
    trainer = trainer_pb2_grpc.TrainerServiceStub(channels["trainer"])
    user = SimulatedUser(
        channels["generation"], channels["feedback"], API_KEY, 0.3, 8, random.Random(2), Tally()
    )
    for _ in range(3):
        user.interact(timeout=60)

    def status():
        return trainer.GetStatus(trainer_pb2.GetStatusRequest())

    assert wait_until(lambda: status().pending_prompts >= 3, timeout=60)
    assert wait_until(lambda: status().phase == "waiting", timeout=30)
    waiting = status()
    assert "reward model v1" in waiting.phase_detail and "v0" in waiting.phase_detail
    time.sleep(6)  # longer than the guard's polling interval: still nothing trained
    assert status().step == 0 and store.versions(POLICY) == []
    info = generation_pb2.GetPolicyInfoRequest()
    assert generation.GetPolicyInfo(info).version == 0

    version = _reward_model_served(channels)
    assert wait_until(lambda: generation.GetPolicyInfo(info).version >= 1, timeout=120), status()
    trained = status()
    assert trained.step >= 1 and trained.reward_version == version
    assert trained.metrics["reward/model_version"] == version
    manifest, _ = store.read_manifest(POLICY, store.versions(POLICY)[0])
    assert manifest.metadata["stats"]["reward/model_version"] == version


def test_feedback_turns_into_a_new_served_policy(platform):
    channels, store = platform
    _reward_model_served(channels)
    generation = generation_pb2_grpc.GenerationServiceStub(channels["generation"])
    trainer = trainer_pb2_grpc.TrainerServiceStub(channels["trainer"])
    fixed = generation_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="How was your day?")],
        sampling=common_pb2.SamplingParams(max_new_tokens=12, temperature=1.0, seed=1234),
        return_logprobs=True,
    )
    before = generation.Generate(fixed)
    assert before.policy_version == 0

    tally = Tally()
    user = SimulatedUser(
        channels["generation"], channels["feedback"], API_KEY, 0.3, 8, random.Random(0), tally
    )
    for _ in range(2):
        user.interact(timeout=60)
    assert sum(tally.total.values()) == 2

    info = generation_pb2.GetPolicyInfoRequest()
    assert wait_until(lambda: generation.GetPolicyInfo(info).version >= 1, timeout=120), (
        f"no new policy served; trainer status: {trainer.GetStatus(trainer_pb2.GetStatusRequest())}"
    )
    status = trainer.GetStatus(trainer_pb2.GetStatusRequest())
    assert status.step >= 1 and status.policy_version >= 1
    assert status.feedback_consumed >= 2
    assert store.versions(POLICY)[-1] >= 1

    after = generation.Generate(fixed)
    assert after.policy_version >= 1
    # Same seed, same prompt, new weights: the sampled answer (or at least its probabilities)
    # must differ.
    assert after.text != before.text or list(after.logprobs) != pytest.approx(
        list(before.logprobs), abs=1e-6
    )
    assert list(after.logprobs) != pytest.approx(list(before.logprobs), abs=1e-6)


def test_an_operator_checkpoints_pauses_and_rolls_back_the_served_policy(platform):
    channels, store = platform
    _reward_model_served(channels)
    generation = generation_pb2_grpc.GenerationServiceStub(channels["generation"])
    trainer = trainer_pb2_grpc.TrainerServiceStub(channels["trainer"])
    info = generation_pb2.GetPolicyInfoRequest()
    fixed = generation_pb2.GenerateRequest(
        prompt="Tell me about your weekend.",
        sampling=common_pb2.SamplingParams(max_new_tokens=12, temperature=1.0, seed=99),
        return_logprobs=True,
    )
    base = generation.Generate(fixed)

    # A checkpoint on demand, before any update: v1 holds the base weights.
    v1 = trainer.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=60)
    assert v1.version == 1 and v1.kind == "policy" and len(v1.manifest_sha256) == 64

    user = SimulatedUser(
        channels["generation"], channels["feedback"], API_KEY, 0.3, 8, random.Random(1), Tally()
    )
    for _ in range(2):
        user.interact(timeout=60)
    assert wait_until(lambda: generation.GetPolicyInfo(info).version >= 2, timeout=120)
    trained = generation.Generate(fixed)
    assert list(trained.logprobs) != pytest.approx(list(base.logprobs), abs=1e-6)

    with pytest.raises(grpc.RpcError) as missing:
        trainer.Rollback(trainer_pb2.RollbackRequest(version=99), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    rolled = trainer.Rollback(trainer_pb2.RollbackRequest(version=1, pause=True), timeout=60)
    assert rolled.rolled_back_from == 1 and rolled.version > v1.version
    assert wait_until(lambda: generation.GetPolicyInfo(info).version == rolled.version, 60)
    again = generation.Generate(fixed)
    assert again.text == base.text
    assert list(again.logprobs) == pytest.approx(list(base.logprobs), abs=1e-5)

    # Paused: new feedback is consumed but not trained on, so the rollback stays served.
    status = trainer.GetStatus(trainer_pb2.GetStatusRequest())
    assert status.paused and status.policy_version == rolled.version
    for _ in range(2):
        user.interact(timeout=60)
    assert wait_until(
        lambda: trainer.GetStatus(trainer_pb2.GetStatusRequest()).pending_prompts >= 2, 60
    )
    assert trainer.GetStatus(trainer_pb2.GetStatusRequest()).step == status.step

    listed = trainer.ListCheckpoints(trainer_pb2.ListCheckpointsRequest(limit=2))
    assert [c.version for c in listed.checkpoints] == [rolled.version, rolled.version - 1]
    assert listed.checkpoints[0].rolled_back_from == 1

    resumed = trainer.Resume(trainer_pb2.ResumeRequest())
    assert not resumed.paused
    assert wait_until(
        lambda: trainer.GetStatus(trainer_pb2.GetStatusRequest()).step > status.step, 120
    )
