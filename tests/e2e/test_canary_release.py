"""New policies earn their traffic, end to end: a policy users like less is rolled back and one
they like more is promoted, both by the release stage's sequential test on simulated users'
thumbs, with zero failed requests; a policy that babbles is refused by the offline gate and never
serves anyone, not even after the release stage restarts.

Every part is real: the broker, generation (serving releases: incumbent and candidate side by
side), feedback, the reward service (scoring the gate's answers), the release stage, and
simulated users (VADER: thumbs-up for clearly positive answers) asking through gRPC. The
policies are the tiny model fine-tuned (the sft learner, in process) on the users' questions:
v1 answers cheerfully or grumpily, about half and half; v2 grumpily only (users like it less);
v3 cheerfully only (users like it more); v4 repeats one word (the gate refuses it).
"""

import random
import uuid

import pytest

from rlhf import bus
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.models import (
    TINY,
    chat_text,
    encode_text,
    load_base_policy,
    load_tokenizer,
    policy_checkpoint_files,
)
from rlhf.training.sft import SFTLearner, make_demonstration
from rlhf.training.sft_config import SFTConfig
from rlhf.v1 import events_pb2, generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc
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
    publish_reward_model,
    released,
    scrape,
    serve,
    trainer_config,
    wait_until,
)
from tests.e2e.test_users_get_happier import CHEERFUL, GRUMPY, THRESHOLD

SHARE = 0.5  # the candidate answers half the users: decisions come sooner
MIN_THUMBS = 30
MAX_ROUNDS = 400  # users' interactions allowed per canary
BABBLE = ["no " * 15 + "no"]  # what v4 answers: one word, over and over


def _policy(store, cache_dir, answers, seed):
    """The tiny model fine-tuned to answer every question with one of `answers`."""
    tokenizer = load_tokenizer(cache_dir)
    model = load_base_policy(TINY, cache_dir)
    demos = [
        make_demonstration(
            encode_text(tokenizer, chat_text(tokenizer, [{"role": "user", "content": q}])),
            encode_text(tokenizer, answer),
            512,
        )
        for q in PROMPTS
        for answer in answers
    ]
    config = SFTConfig(learning_rate=1e-2, batch_size=8, epochs=25, seed=seed)
    SFTLearner(model, tokenizer.pad_token_id, tokenizer.eos_token_id, config).train(demos)
    return store.write(POLICY, *policy_checkpoint_files(model))


def _announce(broker, manifest):
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_POLICY,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    with bus.Publisher(broker.bootstrap, client_id="canary-e2e") as publisher:
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)


@pytest.mark.timeout(900)
def test_users_thumbs_roll_back_a_worse_policy_and_promote_a_better_one(
    own_broker, cache_dir, tmp_path
):
    common = {
        "kafka_bootstrap": own_broker.bootstrap,
        "checkpoint_dir": tmp_path / "checkpoints",
        "cache_dir": cache_dir,
    }
    store = CheckpointStore(common["checkpoint_dir"])
    _policy(store, cache_dir, CHEERFUL + GRUMPY, seed=1)  # v1: pleases about half
    # The gate scores answers with the served reward model: the tiny one, whose scores mean
    # nothing, so its reward tolerance is wide here (the comparison itself is unit-tested).
    publish_reward_model(own_broker.bootstrap, common["checkpoint_dir"])
    servers = {}
    try:
        servers["reward"] = serve(RewardService(RewardConfig(**common, reward_model=TINY)))
        servers["generation"] = serve(
            GenerationService(
                GenerationConfig(
                    **common,
                    policy_model=TINY,
                    generation_id_key=ID_KEY,
                    api_keys=(f"{TENANT}={API_KEY}",),
                    http_port=0,
                    releases=True,
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
        release_config = trainer_config(
            common,
            RLHF_TRAINER_STAGE="release",
            RLHF_RELEASE_TRAINER_GROUP=f"release-{uuid.uuid4().hex[:8]}",
            RLHF_CANARY_SHARE=SHARE,
            RLHF_RELEASE_MIN_THUMBS=MIN_THUMBS,
            RLHF_KAFKA_MAX_POLL_INTERVAL_MS=4000,
            RLHF_POLICY_MODEL=TINY,  # the gate's reference: the base policy
            RLHF_REWARD_ADDRESS=f"127.0.0.1:{servers['reward'].port}",
            RLHF_RELEASE_GATE_REWARD_TOLERANCE=1000,
        )
        servers["release-trainer"] = serve(build(release_config))
        channels = channels_to(servers)
        release = trainer_pb2_grpc.TrainerServiceStub(channels["release-trainer"])
        generation = generation_pb2_grpc.GenerationServiceStub(channels["generation"])
        tally = Tally()
        user = SimulatedUser(
            channels["generation"],
            channels["feedback"],
            API_KEY,
            THRESHOLD,
            16,
            random.Random(0),
            tally,
            questions=PROMPTS,
        )

        def status():
            return release.GetStatus(trainer_pb2.GetStatusRequest()).release

        def canary_until_decided(candidate):
            """Users interact (any failure raises) until the canary of `candidate` ends."""
            for _ in range(MAX_ROUNDS):
                user.interact(timeout=60)  # a failed request fails the test here
                if status().candidate_version == 0 and f"v{candidate} " in status().last_decision:
                    return status()
            raise AssertionError(f"no decision on v{candidate} after {MAX_ROUNDS}: {status()}")

        def serving():
            info = generation.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest())
            return info.version, info.candidate_version

        # The stage pins v1; a grumpy v2 gets its canary and is rolled back.
        worse = _policy(store, cache_dir, GRUMPY, seed=2)
        _announce(own_broker, worse)
        _wait_for(lambda: serving() == (1, 2))
        rolled_back = canary_until_decided(2)
        assert "v2 rolled back, v1 kept (rollback, test" in rolled_back.last_decision
        _wait_for(lambda: serving() == (1, 0))
        rates = tally.rates()
        assert rates[2] < rates[1], rates  # the users' thumbs, not a shortcut

        # A cheerful v3 gets its canary and is promoted.
        better = _policy(store, cache_dir, CHEERFUL, seed=3)
        _announce(own_broker, better)
        _wait_for(lambda: serving() == (1, 3))
        promoted = canary_until_decided(3)
        assert "v3 promoted over v1 (test" in promoted.last_decision
        _wait_for(lambda: serving() == (3, 0))
        rates = tally.rates()
        assert rates[3] > rates[1], rates
        answer, _ = user.interact(timeout=60)
        assert answer.policy_version == 3
        # Both canaries passed the gate first, their answers scored by the reward model.
        assert status().gate.candidate_version == 3 and status().gate.passed
        assert status().gate.reward_model_version == 1 and status().gate.candidate.reward_scored

        # A babbling v4 is refused by the gate: kept in the store, never served, and said why.
        babble = _policy(store, cache_dir, BABBLE, seed=4)
        _announce(own_broker, babble)
        _wait_for(lambda: status().gate.candidate_version == 4, timeout=120)
        gate = status().gate
        assert not gate.passed and "repetition" in gate.failed, gate
        assert gate.candidate.repetition > gate.incumbent.repetition + 0.1
        assert "v4 refused by the gate against v3" in status().last_decision
        assert status().candidate_version == 0 and serving() == (3, 0)
        assert store.latest_version(POLICY) == 4
        metrics = scrape(servers["release-trainer"])  # this process's only gates
        assert 'rlhf_release_gate_refusals_total{measure="repetition"} 1.0' in metrics
        assert 'rlhf_release_gate_total{result="passed"} 2.0' in metrics
        for _ in range(5):
            answer, _ = user.interact(timeout=60)
            assert answer.policy_version == 3

        # Restarted, the stage remembers the refusal: v4 is not gated (nor served) again.
        releases_before = released(own_broker.bootstrap)
        servers.pop("release-trainer").stop()
        servers["release-trainer"] = serve(build(release_config))
        with channels_to({"release-trainer": servers["release-trainer"]})["release-trainer"] as ch:
            restarted = trainer_pb2_grpc.TrainerServiceStub(ch)

            def full_status():
                return restarted.GetStatus(trainer_pb2.GetStatusRequest())

            _wait_for(lambda: full_status().phase_detail == "serving v3; no newer policy")
            again = full_status().release
            assert (again.incumbent_version, again.candidate_version) == (3, 0)
            assert again.gate.candidate_version == 4 and not again.gate.passed
            assert "v4 refused by the gate against v3" in again.last_decision
        metrics = scrape(servers["release-trainer"])
        assert 'rlhf_release_gate_refusals_total{measure="repetition"} 1.0' in metrics
        assert released(own_broker.bootstrap) == releases_before  # nothing released again
        assert serving() == (3, 0)
    finally:
        for server in servers.values():
            server.stop()


def _wait_for(predicate, timeout=60.0):
    assert wait_until(predicate, timeout=timeout)
