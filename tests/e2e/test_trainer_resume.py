"""kill -9 a trainer stage mid-training, start it again: it continues from its last checkpoint
and every feedback event is used exactly once (the ppo stage: counted by the ledger in the final
checkpoint; the reward stage: every rating consumed is in its next round's training set).

A real broker of its own (the test counts every event on the topics), the real reward service,
the trainer as a real process with the tiny model. Events are produced straight to the topics, as
the generation and feedback services would.
"""

import json
import signal
import uuid
from collections import Counter

import pytest

from rlhf import bus
from rlhf.broker import free_port
from rlhf.checkpoints import POLICY, PPO_STATE, REWARD_STATE, CheckpointStore
from rlhf.joining import Ledger
from rlhf.models import TINY, load_tokenizer
from rlhf.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from services.simulated_users.synthetic import feedback_stream
from tests.conftest import OPERATOR_KEY, channel, serve, wait_until
from tests.processes import start_service

PROMPTS = ["Tell me about rain.", "Describe a Monday.", "How was the trip?", "Write a haiku."]


def _events(tokenizer, count, prefix):
    """`count` generation events and one thumbs feedback event on each."""
    generations, feedback = [], []
    for i in range(count):
        gid = f"{prefix}-{i}"
        prompt = PROMPTS[i % len(PROMPTS)]
        generation = events_pb2.GenerationEvent(
            generation_id=gid,
            prompt=prompt,
            prompt_token_ids=tokenizer(prompt)["input_ids"],
            response="ok",
        )
        generation.created_at.GetCurrentTime()
        generations.append(generation)
        thumb = events_pb2.THUMB_UP if i % 2 else events_pb2.THUMB_DOWN
        feedback.append(
            events_pb2.FeedbackEvent(
                event_id=f"event-{gid}",
                feedback=events_pb2.Feedback(generation_id=gid, thumb=thumb),
            )
        )
    return generations, feedback


def _publish(publisher, events, topic):
    for event in events:
        key = event.generation_id if topic == bus.GENERATIONS else event.feedback.generation_id
        publisher.publish(topic, key, event)


@pytest.fixture
def reward(own_broker, cache_dir, tmp_path):
    config = RewardConfig(
        kafka_bootstrap=own_broker.bootstrap,
        checkpoint_dir=tmp_path / "checkpoints",
        cache_dir=cache_dir,
        reward_model=TINY,
    )
    server = serve(RewardService(config))
    yield server
    server.stop()


def test_a_killed_trainer_resumes_and_uses_every_feedback_event_exactly_once(
    own_broker, cache_dir, tmp_path, reward
):
    store = CheckpointStore(tmp_path / "checkpoints")
    metrics_log = tmp_path / "ppo.jsonl"
    port = free_port()
    env = {
        "RLHF_KAFKA_BOOTSTRAP": own_broker.bootstrap,
        "RLHF_CHECKPOINT_DIR": str(store.root),
        "RLHF_CACHE_DIR": str(cache_dir),
        "RLHF_POLICY_MODEL": TINY,
        "RLHF_REWARD_ADDRESS": f"127.0.0.1:{reward.port}",
        "RLHF_TRAINER_GROUP": f"resume-{uuid.uuid4().hex[:8]}",
        "RLHF_KAFKA_MAX_POLL_INTERVAL_MS": "4000",
        "RLHF_PPO_MIN_REWARD_VERSION": "0",  # the untrained reward head serves the plumbing
        "RLHF_PPO_BATCH_SIZE": "2",
        "RLHF_PPO_MINIBATCH_SIZE": "2",
        "RLHF_PPO_EPOCHS": "1",
        "RLHF_PPO_RESPONSE_TOKENS": "6",
        "RLHF_PUBLISH_EVERY_UPDATES": "3",
        "RLHF_TRAINER_METRICS_LOG": str(metrics_log),
    }
    tokenizer = load_tokenizer(cache_dir)
    publisher = bus.Publisher(own_broker.bootstrap, client_id="resume-test")
    first_generations, first_feedback = _events(tokenizer, 16, "first")
    _publish(publisher, first_generations, bus.GENERATIONS)
    _publish(publisher, first_feedback, bus.FEEDBACK)

    log_path = tmp_path / "trainer.log"
    trainer = start_service("services.trainer", env, port, log_path)
    try:
        # Kill it once every first-wave event is consumed and trained on, with the updates
        # after the last checkpoint (step 6) never checkpointed.
        assert wait_until(lambda: _steps(metrics_log) >= 8, timeout=120), log_path.read_text()
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=10)
        killed_at = len(_steps_logged(metrics_log))
        assert store.versions(POLICY) == [1, 2] and store.versions(PPO_STATE) == [1, 2]

        # While it is down: more traffic, feedback arriving before its generation, and a
        # replay of feedback the killed trainer already used.
        second_generations, second_feedback = _events(tokenizer, 8, "second")
        _publish(publisher, second_feedback, bus.FEEDBACK)
        _publish(publisher, second_generations, bus.GENERATIONS)
        _publish(publisher, first_feedback[:3], bus.FEEDBACK)

        trainer = start_service("services.trainer", env, port, log_path)
        with channel(port, OPERATOR_KEY) as opened:
            control = trainer_pb2_grpc.TrainerServiceStub(opened)

            def all_used():
                status = control.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5)
                return status.feedback_used == 24 and status.pending_prompts == 0

            assert wait_until(all_used, timeout=120), log_path.read_text()[-3000:]
            final = control.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=60)
    finally:
        if trainer.poll() is None:
            trainer.send_signal(signal.SIGTERM)
            trainer.wait(timeout=30)
        publisher.close()

    manifest, _ = store.read_manifest(POLICY, final.version)
    every_id = [e.event_id for e in first_feedback + second_feedback]
    expected = Ledger.of(every_id)
    assert manifest.metadata["feedback_used"] == 24
    assert manifest.metadata["feedback_digest"] == f"{expected.digest:016x}"
    # The restarted trainer went on from update 7 (its checkpoint's 6, plus one), not from 1.
    assert "resumed from policy v2 at update 6" in log_path.read_text()
    resumed_steps = _steps_logged(metrics_log)[killed_at:]
    # 24 events, 12 used by the checkpointed 6 updates, the other 12 in 6 more updates of 2.
    assert resumed_steps == list(range(7, 13)), resumed_steps


def _steps_logged(path):
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def _steps(path):
    steps = _steps_logged(path)
    return steps[-1] if steps else 0


def _ratings(rounds, seed):
    """Simulated users' generations and thumbs, and how many examples the reward stage makes of
    them (one per thumb). No rankings: whether a ranking's other generation is known when the
    ranking joins depends on which partition is read first, so their pairs cannot be counted."""
    events = list(feedback_stream(rounds, seed=seed, rankings=False))
    return events, sum(isinstance(e, events_pb2.FeedbackEvent) for e in events)


def _publish_ratings(publisher, events):
    for event in events:
        if isinstance(event, events_pb2.GenerationEvent):
            publisher.publish(bus.GENERATIONS, event.generation_id, event)
        else:
            publisher.publish(bus.FEEDBACK, event.feedback.generation_id, event)


def _rows(events):
    """The examples the reward stage makes of these thumbs, as a reward state stores them."""
    generations = {e.generation_id: e for e in events if isinstance(e, events_pb2.GenerationEvent)}
    rows = []
    for event in events:
        if isinstance(event, events_pb2.FeedbackEvent):
            rated = generations[event.feedback.generation_id]
            up = 1.0 if event.feedback.thumb == events_pb2.THUMB_UP else 0.0
            rows.append(("rated", rated.prompt, rated.response, up))
    return rows


def _reward_state_examples(store, version):
    """The examples (both splits) a reward state holds, as (kind, prompt, text, other) rows."""
    dataset = store.load(REWARD_STATE, version).json_files["intake.json"]["dataset"]
    return [tuple(row) for row in dataset["train"] + dataset["heldout"]]


def test_a_killed_reward_stage_restarts_with_every_rating_it_consumed(
    own_broker, cache_dir, tmp_path
):
    """The reward stage trains each round on every rating so far: after kill -9 it restores its
    state (the examples and the offsets they cover), reads what came after once, and its next
    round trains on all of it."""
    store = CheckpointStore(tmp_path / "checkpoints")
    port = free_port()
    env = {
        "RLHF_KAFKA_BOOTSTRAP": own_broker.bootstrap,
        "RLHF_CHECKPOINT_DIR": str(store.root),
        "RLHF_CACHE_DIR": str(cache_dir),
        "RLHF_TRAINER_STAGE": "reward",
        "RLHF_REWARD_MODEL": TINY,
        "RLHF_REWARD_TRAINER_GROUP": f"reward-resume-{uuid.uuid4().hex[:8]}",
        "RLHF_KAFKA_MAX_POLL_INTERVAL_MS": "4000",
        "RLHF_REWARD_STEPS_PER_ROUND": "5",
        "RLHF_REWARD_MAX_TOKENS": "64",
    }
    first, first_examples = _ratings(20, seed=1)
    second, second_examples = _ratings(6, seed=2)
    third, third_examples = _ratings(20, seed=3)
    # A round once the first wave is in, none on the second alone.
    env["RLHF_REWARD_ROUND_EXAMPLES"] = str(first_examples)
    assert second_examples < first_examples <= second_examples + third_examples
    feedback = [sum(isinstance(e, events_pb2.FeedbackEvent) for e in w) for w in (first, second)]
    publisher = bus.Publisher(own_broker.bootstrap, client_id="reward-resume-test")
    log_path = tmp_path / "reward-stage.log"

    def status():
        with channel(port, OPERATOR_KEY) as opened:
            control = trainer_pb2_grpc.TrainerServiceStub(opened)
            return control.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5)

    _publish_ratings(publisher, first)
    stage = start_service("services.trainer", env, port, log_path)
    try:
        assert wait_until(lambda: store.versions(REWARD_STATE) == [1], timeout=120)
        assert len(_reward_state_examples(store, 1)) == first_examples
        _publish_ratings(publisher, second)
        consumed = sum(feedback)
        assert wait_until(lambda: status().feedback_consumed == consumed, timeout=60)
        stage.send_signal(signal.SIGKILL)  # the second wave consumed, never saved
        stage.wait(timeout=10)

        stage = start_service("services.trainer", env, port, log_path)
        assert wait_until(lambda: status().feedback_consumed == consumed, timeout=60)
        _publish_ratings(publisher, third)
        assert wait_until(lambda: store.versions(REWARD_STATE) == [1, 2], timeout=120), (
            log_path.read_text()[-3000:]
        )
        examples = _reward_state_examples(store, 2)
        consumed_then = store.load(REWARD_STATE, 2).json_files["intake.json"]["counters"]
        # Round 2 starts once 40 new ratings are in, so part of the third wave may come after
        # it; what it trained on is every rating consumed by then, each once (a thumb is one
        # example), the second wave included: it was not lost with the kill (its offsets were
        # never committed) and the first was not read twice.
        assert len(examples) == consumed_then["feedback_consumed"] > consumed
        assert Counter(_rows(first + second)) <= Counter(examples)
        third_feedback = sum(isinstance(e, events_pb2.FeedbackEvent) for e in third)
        assert wait_until(lambda: status().feedback_consumed == consumed + third_feedback)
    finally:
        stage.send_signal(signal.SIGTERM)
        stage.wait(timeout=60)
        publisher.close()
