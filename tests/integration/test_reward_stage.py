"""The reward stage on a real broker: simulated users' feedback -> training rounds -> a reward
checkpoint published -> the reward service hot-reloads it and scores change; a model that
regresses on the held-out set is not published."""

import statistics
import time
import uuid

import pytest
import torch
from prometheus_client import REGISTRY

from rlhf.checkpoints import REWARD, REWARD_STATE, CheckpointStore
from rlhf.models import TINY, encode_reward_inputs, load_reward_backbone, reward_from_checkpoint
from rlhf.training.reward import in_heldout
from rlhf.v1 import events_pb2, reward_pb2, reward_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from services.simulated_users.synthetic import feedback_stream
from services.trainer.main import build
from services.trainer.reward.service import RewardTrainerService
from services.trainer.servicer import TRAINING
from tests.conftest import (
    READER_KEY,
    SERVICE_KEY,
    channel,
    publish_events,
    serve,
    trainer_config,
    wait_until,
)

HELDOUT = 0.25
PROBE = reward_pb2.ScoreRequest(
    pairs=[
        reward_pb2.ScoredPair(prompt="How was your weekend?", response=text)
        for text in ("My weekend was wonderful!", "My weekend was awful, and I hate it.")
    ]
)


def _trainer_config(broker, store, **overrides):
    settings = {
        "RLHF_TRAINER_STAGE": "reward",
        "RLHF_REWARD_MODEL": TINY,
        "RLHF_REWARD_TRAINER_GROUP": f"reward-stage-{uuid.uuid4().hex[:8]}",
        "RLHF_KAFKA_MAX_POLL_INTERVAL_MS": 4000,
        "RLHF_REWARD_ROUND_EXAMPLES": 300,
        "RLHF_REWARD_STEPS_PER_ROUND": 60,
        "RLHF_REWARD_LEARNING_RATE": 1e-3,
        "RLHF_REWARD_TRAINABLE_LAYERS": -1,
        "RLHF_REWARD_MAX_TOKENS": 64,
        "RLHF_REWARD_HELDOUT_FRACTION": HELDOUT,
        "RLHF_REWARD_MIN_HELDOUT": 10,
        **overrides,
    }
    return trainer_config(
        {"kafka_bootstrap": broker.bootstrap, "checkpoint_dir": store}, **settings
    )


@pytest.fixture
def broker(own_broker):
    """A broker of this module's tests' own: the stage trains on every rating on the feedback
    topic, and other tests' ratings (random thumbs, corrupt records) on the session broker made
    a round learn nothing (held-out pairwise accuracy 0.48 on 2,663 ratings, 150 of them ours)."""
    return own_broker


@pytest.fixture
def reward_service(broker, tmp_path):
    config = RewardConfig(
        kafka_bootstrap=broker.bootstrap,
        checkpoint_dir=tmp_path / "checkpoints",
        reward_model=TINY,
        drift_sample=0.0,
        dtype="float32",  # scores compared with the stage's own float32 evaluation
    )
    running = serve(RewardService(config))
    with channel(running, SERVICE_KEY) as opened:
        yield reward_pb2_grpc.RewardServiceStub(opened)
    running.stop()


def test_trained_reward_model_is_published_and_served(broker, tmp_path, reward_service):
    store = CheckpointStore(tmp_path / "checkpoints")
    service = build(_trainer_config(broker, store.root))
    assert isinstance(service, RewardTrainerService)
    trainer = serve(service)
    try:
        before = reward_service.Score(PROBE)
        assert before.model_version == 0
        events = list(feedback_stream(150, seed=11))
        publish_events(broker.bootstrap, events)
        assert wait_until(lambda: reward_service.Score(PROBE).model_version >= 1, timeout=120), (
            f"no reward model served; trainer: {service.loop.status}"
        )
        after = reward_service.Score(PROBE)
        assert list(after.scores) != pytest.approx(list(before.scores), abs=1e-3)

        with channel(trainer, READER_KEY) as opened:
            status = trainer_pb2_grpc.TrainerServiceStub(opened).GetStatus(
                trainer_pb2.GetStatusRequest()
            )
        assert status.stage == "reward" and status.step >= 1
        assert status.reward_version >= 1 and status.feedback_consumed >= 300
        assert status.metrics["heldout/pairwise_accuracy"] > 0.6
        version = store.latest_version(REWARD)
        manifest, _ = store.read_manifest(REWARD, version)
        stats = manifest.metadata["stats"]
        assert stats["heldout/pairwise_accuracy"] > 0.6

        # The service serves the checkpoint's raw score shifted and scaled by the normalisation
        # the trainer computed on reference-policy answers.
        answers = [
            (e.messages[0].content, e.response)
            for e in events
            if isinstance(e, events_pb2.GenerationEvent)
        ]
        model = reward_from_checkpoint(store.load(REWARD, version))
        encoded = encode_reward_inputs(
            load_reward_backbone(TINY)[1], *zip(*answers[:32], strict=True), max_tokens=256
        )
        with torch.inference_mode():
            raw = model(**encoded).logits[:, 0].tolist()
        shift, scale = stats["normalisation/shift"], stats["normalisation/scale"]
        reply = reward_service.Score(
            reward_pb2.ScoreRequest(
                pairs=[reward_pb2.ScoredPair(prompt=p, response=r) for p, r in answers[:32]]
            )
        )
        assert reply.model_version == version
        assert list(reply.scores) == pytest.approx([(r - shift) / scale for r in raw], abs=1e-4)
        # On (mostly) those reference answers, served rewards are about N(0, 1); the exact
        # property is pinned in tests/unit/test_reward_training.py.
        served = []
        for start in range(0, len(answers), 64):
            batch = answers[start : start + 64]
            served += reward_service.Score(
                reward_pb2.ScoreRequest(
                    pairs=[reward_pb2.ScoredPair(prompt=p, response=r) for p, r in batch]
                )
            ).scores
        assert abs(statistics.fmean(served)) < 0.5 and 0.5 < statistics.pstdev(served) < 1.5
    finally:
        trainer.stop()


def _poisoned(events, heldout_fraction):
    """The same users, but a client bug flips every train-split signal: thumbs inverted and
    rankings reversed. Held-out feedback stays honest, as the gate's ground truth."""
    for event in events:
        if isinstance(event, events_pb2.FeedbackEvent):
            _flip_unless_heldout(event.feedback, heldout_fraction)
        yield event


def _flip_unless_heldout(feedback, heldout_fraction):
    if in_heldout(feedback.generation_id, heldout_fraction):
        return
    if feedback.WhichOneof("signal") == "thumb":
        up = feedback.thumb == events_pb2.THUMB_UP
        feedback.thumb = events_pb2.THUMB_DOWN if up else events_pb2.THUMB_UP
    else:
        ids = list(feedback.ranking.generation_ids)
        feedback.ranking.ClearField("generation_ids")
        feedback.ranking.generation_ids.extend(reversed(ids))


def _publish_and_wait(broker, service, events):
    """Publish `events`, then wait until the intake has read as many more feedback records and
    then nothing for 1.5 s."""
    target = service.intake.feedback_consumed + sum(
        isinstance(e, events_pb2.FeedbackEvent) for e in events
    )
    publish_events(broker.bootstrap, events)
    assert wait_until(lambda: service.intake.feedback_consumed >= target, timeout=60)
    last, quiet_since = service.intake.feedback_consumed, time.monotonic()
    while time.monotonic() - quiet_since < 1.5:
        time.sleep(0.1)
        if service.intake.feedback_consumed != last:
            last, quiet_since = service.intake.feedback_consumed, time.monotonic()


def _rounds(outcome):
    value = REGISTRY.get_sample_value("rlhf_reward_trainer_rounds_total", {"outcome": outcome})
    return value or 0.0


def test_a_regressed_reward_model_is_not_published(broker, tmp_path, reward_service):
    store = CheckpointStore(tmp_path / "checkpoints")
    service = RewardTrainerService(_trainer_config(broker, store.root))
    # Rounds are driven by the test (not the background thread), so each sees a known dataset.
    service.intake.start()
    try:
        _publish_and_wait(broker, service, list(feedback_stream(120, seed=21)))
        first = service.loop.run_round()
        assert first.promoted, first.reasons
        assert store.versions(REWARD) == [1]
        assert wait_until(lambda: reward_service.Score(PROBE).model_version == 1, timeout=30)
        served = list(reward_service.Score(PROBE).scores)

        regressed = _rounds("regressed")
        # Twice the clean data, flipped: with 300 a round sometimes learnt too little of the
        # flip to be clearly worse than the served model, and was published.
        poisoned = list(_poisoned(feedback_stream(600, seed=22), HELDOUT))
        _publish_and_wait(broker, service, poisoned)
        second = service.loop.run_round()
        assert not second.promoted
        # Refused for doing worse than the served model, not for lack of held-out data.
        # (Trained mostly on flipped labels it may well rank worse than chance too.)
        assert any(" vs served " in reason for reason in second.reasons), second.reasons
        assert not any(reason.startswith("only ") for reason in second.reasons)
        assert _rounds("regressed") == regressed + 1
        # The served model judged the fresh feedback, most of it flipped: it disagrees.
        assert second.agreement["thumbs_auc"] < 0.5

        assert store.versions(REWARD) == [1]
        assert service.loop.status.reward_version == 1
        time.sleep(1.0)
        reply = reward_service.Score(PROBE)
        assert reply.model_version == 1 and list(reply.scores) == pytest.approx(served)
    finally:
        service.stop()


def test_a_stop_gives_a_running_round_up_and_a_restart_reads_its_feedback_again(broker, tmp_path):
    """Stopping does not wait for a round to end (one can take minutes on a CPU): the stage
    gives it up at its next step. Nothing of it is written and its offsets stay uncommitted,
    so the restarted stage (same group, same store) reads every rating again."""
    store = CheckpointStore(tmp_path / "checkpoints")
    # A round of a million steps: it ends only if the stop gives it up.
    config = _trainer_config(
        broker,
        store.root,
        RLHF_REWARD_ROUND_EXAMPLES=50,
        RLHF_REWARD_STEPS_PER_ROUND=1_000_000,
        RLHF_REWARD_EPOCHS_PER_ROUND=1e6,
    )
    events = list(feedback_stream(60, seed=31))
    ratings = sum(isinstance(e, events_pb2.FeedbackEvent) for e in events)
    service = RewardTrainerService(config)
    service.start()
    try:
        publish_events(broker.bootstrap, events)
        assert wait_until(lambda: service.loop.status.phase == TRAINING, timeout=60)
        assert wait_until(lambda: service.loop.trainer.steps >= 2, timeout=60)
    finally:
        service.stop()
    assert not service.loop._thread.is_alive()
    assert service.loop.trainer.rounds == 0 and service.loop.status.reward_version == 0
    assert store.versions(REWARD) == [] and store.versions(REWARD_STATE) == []

    again = RewardTrainerService(config)
    again.intake.start()
    try:
        assert wait_until(lambda: again.intake.feedback_consumed >= ratings, timeout=60), (
            f"the restart read {again.intake.feedback_consumed} of {ratings} ratings"
        )
        assert again.loop.pending() >= 50
    finally:
        again.stop()
