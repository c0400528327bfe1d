"""The whole loop, measured the way a product owner would: simulated users are happier with the
last policy than with the first.

sft -> reward -> ppo, every stage and service real (broker, gRPC over loopback), the policy the
tiny model. A random tiny model only babbles, so the sft stage first teaches it two kinds of
answer to the users' questions, a cheerful one and a grumpy one, equally often: the users
(VADER, thumbs-up for clearly positive answers) then rate about half its answers up. The reward
stage learns their taste from those thumbs (MiniLM), and PPO, held to the sft policy by the KL
penalty, shifts the policy towards the answers they like. The same loop runs once more with GRPO
in PPO's place (RLHF_PPO_ALGORITHM=grpo: groups of answers per prompt, no value head).
"""

import json
import random
import uuid
from dataclasses import dataclass

import pytest

from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.models import MINILM, TINY
from rlhf.v1 import (
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
from services.simulated_users.synthetic import PROMPTS
from services.simulated_users.users import SimulatedUser, Tally
from services.trainer.main import build
from tests.conftest import (
    API_KEY,
    ID_KEY,
    TENANT,
    channels_to,
    serve,
    trainer_config,
    wait_until,
)

THRESHOLD = 0.3
CHEERFUL = ["I love it, what a wonderful and happy time!", "Great, it is lovely and fun!"]
GRUMPY = ["I hate it, what an awful and sad time.", "Terrible, it is horrible and boring."]
# Users' ratings of the sft policy (also PPO's prompts: 12 updates of 16) and of the last policy.
BEFORE, AFTER = 192, 160
UPDATES = 12
# Gains measured over 8 runs: 0.33 to 0.42 (KL 0.5 to 4 nats). PPO's outcome varied with smaller
# batches: with batches of 4, gains 0.04 to 0.45 (one run in seven below 0.15); of 8, one run
# in thirteen drifted to 9 nats with a gain of 0.08. The sampling noise on the gain is about 0.05.
MARGIN = 0.15
# Reward rounds every 48 ratings, each on all ratings so far. The held-out split is a hash of the
# (random) generation ids, so a round can lack held-out examples: at most 5 of 48 in 6% of runs
# (of 32 in 36%, which failed CI once), of 96 in 4e-5. 192 ratings make several rounds.
REWARD_ROUND, REWARD_MIN_HELDOUT = 48, 6


def _demonstrations(path):
    lines = [
        {"messages": [{"role": "user", "content": q}], "response": answer}
        for q in PROMPTS
        for answer in CHEERFUL + GRUMPY
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines))


def _interact(user, times):
    for _ in range(times):
        user.interact(timeout=60)


@pytest.fixture
def common(own_broker, cache_dir, tmp_path):
    # Its own broker: the stages would otherwise learn from other tests' feedback too.
    return {
        "kafka_bootstrap": own_broker.bootstrap,
        "checkpoint_dir": tmp_path / "checkpoints",
        "cache_dir": cache_dir,
    }


# The ppo stage's settings for PPO (besides the shared ones in `_loop`).
PPO = {
    "RLHF_PPO_BATCH_SIZE": 16,
    "RLHF_PPO_MINIBATCH_SIZE": 16,
    "RLHF_PPO_LEARNING_RATE": 5e-4,
}

# GRPO in PPO's place: the same 16 rollouts per update, as 4 answers to each of 4 prompts.
GRPO = {
    "RLHF_PPO_ALGORITHM": "grpo",
    "RLHF_PPO_GROUP_SIZE": 4,
    "RLHF_PPO_BATCH_SIZE": 4,
    "RLHF_PPO_MINIBATCH_SIZE": 16,
    "RLHF_PPO_LEARNING_RATE": 5e-4,
}
GRPO_MARGIN = 0.15


@dataclass(frozen=True)
class Outcome:
    first_rate: float  # thumbs-up rate of the sft policy (v1)
    last_rate: float  # of the last policy
    pinned: int  # the last policy's version
    final: trainer_pb2.TrainerStatus  # the trainer when it was pinned


@pytest.mark.timeout(900)  # three stages and five services; about 2-3 minutes on 2 cores
def test_simulated_users_rate_the_last_policy_above_the_first(common, tmp_path):
    outcome = _loop(common, tmp_path, PPO)
    assert outcome.last_rate >= outcome.first_rate + MARGIN, (
        f"thumbs-up {outcome.first_rate:.2f} (v1) -> {outcome.last_rate:.2f} "
        f"(v{outcome.pinned}); trainer: {outcome.final}"
    )
    assert outcome.final.kl < 25.0, "PPO stayed near the sft policy"


@pytest.mark.timeout(900)
def test_grpo_in_ppos_place_raises_the_thumbs_up_rate_with_kl_bounded(common, tmp_path):
    outcome = _loop(common, tmp_path, GRPO)
    assert outcome.last_rate >= outcome.first_rate + GRPO_MARGIN, (
        f"thumbs-up {outcome.first_rate:.2f} (v1) -> {outcome.last_rate:.2f} "
        f"(v{outcome.pinned}); trainer: {outcome.final}"
    )
    assert outcome.final.algorithm == "grpo"
    assert outcome.final.kl < 25.0, "GRPO stayed near the sft policy"
    metrics = outcome.final.metrics
    assert "loss/value" not in metrics  # no critic
    # Reported like TRL's GRPOTrainer: groups of answers really were sampled and compared.
    assert 0.0 <= metrics["frac_reward_zero_std"] <= 1.0 and metrics["reward_std"] >= 0.0


def _loop(common, tmp_path, ppo_stage: dict, seed: int = 0) -> Outcome:
    """sft, then the reward stage and the ppo stage (`ppo_stage`: its algorithm's settings)
    while users rate the sft policy, UPDATES updates, then users rate the last policy."""
    store = CheckpointStore(common["checkpoint_dir"])
    group = uuid.uuid4().hex[:8]
    data = tmp_path / "demos.jsonl"
    _demonstrations(data)
    sft = serve(
        build(
            trainer_config(
                common,
                RLHF_TRAINER_STAGE="sft",
                RLHF_POLICY_MODEL=TINY,
                RLHF_SFT_DATA=data,
                RLHF_SFT_TRAINER_GROUP=f"sft-{group}",
                RLHF_SFT_EPOCHS=25,
                RLHF_SFT_LEARNING_RATE=1e-2,
                RLHF_SFT_BATCH_SIZE=8,
            )
        )
    )
    try:
        assert wait_until(lambda: store.versions(POLICY) == [1], timeout=180)
    finally:
        sft.stop()

    servers = {}
    try:
        servers["reward"] = serve(RewardService(RewardConfig(**common, reward_model=MINILM)))
        servers["reward-trainer"] = serve(
            build(
                trainer_config(
                    common,
                    RLHF_TRAINER_STAGE="reward",
                    RLHF_REWARD_MODEL=MINILM,
                    RLHF_REWARD_TRAINER_GROUP=f"reward-{group}",
                    RLHF_REWARD_ROUND_EXAMPLES=REWARD_ROUND,
                    RLHF_REWARD_MIN_HELDOUT=REWARD_MIN_HELDOUT,
                    RLHF_REWARD_STEPS_PER_ROUND=60,
                    RLHF_KAFKA_MAX_POLL_INTERVAL_MS=4000,
                )
            )
        )
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
                FeedbackConfig(
                    **common, generation_id_key=ID_KEY, api_keys=(f"{TENANT}={API_KEY}",)
                )
            )
        )
        servers["trainer"] = serve(
            build(
                trainer_config(
                    common,
                    RLHF_POLICY_MODEL=TINY,
                    RLHF_REWARD_ADDRESS=f"127.0.0.1:{servers['reward'].port}",
                    RLHF_TRAINER_GROUP=f"ppo-{group}",
                    RLHF_KAFKA_MAX_POLL_INTERVAL_MS=4000,
                    RLHF_PPO_EPOCHS=2,
                    RLHF_PPO_INIT_KL_COEF=0.1,
                    RLHF_PPO_RESPONSE_TOKENS=16,
                    RLHF_PUBLISH_EVERY_UPDATES=2,
                    RLHF_PPO_REFERENCE_VERSION=1,
                    RLHF_SEED=seed,
                    **ppo_stage,
                )
            )
        )
        channels = channels_to(servers)
        trainer = trainer_pb2_grpc.TrainerServiceStub(channels["trainer"])
        generation = generation_pb2_grpc.GenerationServiceStub(channels["generation"])
        reward = reward_pb2_grpc.RewardServiceStub(channels["reward"])
        # PPO waits until a reward model has learnt the users' taste: before that, scores are
        # an untrained head's noise.
        trainer.Pause(trainer_pb2.PauseRequest())
        assert generation.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest()).version == 1

        tally = Tally()
        user = SimulatedUser(
            channels["generation"],
            channels["feedback"],
            API_KEY,
            THRESHOLD,
            16,
            random.Random(seed),
            tally,
            questions=PROMPTS,  # the questions the demonstrations answer
        )
        _interact(user, BEFORE)
        first_rate = tally.rates()[1]
        assert 0.2 <= first_rate <= 0.8, f"the sft policy should please about half: {first_rate}"

        def reward_served():
            # Published, then loaded by the reward service: PPO's first batches would otherwise
            # be scored by the untrained head.
            return reward.GetModelInfo(reward_pb2.GetModelInfoRequest()).version >= 1

        assert wait_until(reward_served, timeout=240)
        trainer.Resume(trainer_pb2.ResumeRequest())

        def trained(updates):
            return trainer.GetStatus(trainer_pb2.GetStatusRequest()).step >= updates

        assert wait_until(lambda: trained(UPDATES), timeout=300)
        # Pin the last policy while users rate it: pause, then checkpoint after the running
        # update, so no newer version appears meanwhile.
        trainer.Pause(trainer_pb2.PauseRequest())
        pinned = trainer.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=120).version
        final = trainer.GetStatus(trainer_pb2.GetStatusRequest())
        info = generation_pb2.GetPolicyInfoRequest()
        assert wait_until(lambda: generation.GetPolicyInfo(info).version == pinned)
        _interact(user, AFTER)
        return Outcome(first_rate, tally.rates()[pinned], pinned, final)
    finally:
        for name in ("trainer", "feedback", "generation", "reward-trainer", "reward"):
            if name in servers:
                servers[name].stop()
