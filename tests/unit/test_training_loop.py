"""The PPO loop's bookkeeping around an update: JSONL metrics, KL warnings, feedback ledger,
staleness, and a batch put back when the reward service is down. The learner is a stand-in
(a pure unit seam); the real one is exercised by the e2e tests."""

import json
import logging
import time
from unittest import mock

import pytest

from rlhf import bus
from rlhf.clients import RewardUnavailable
from rlhf.joining import Ledger
from rlhf.training import Interrupted, never
from rlhf.training.ppo_config import PPOConfig
from rlhf.v1 import events_pb2
from services.trainer.ppo.intake import Intake
from services.trainer.ppo.loop import FAILED_BATCHES, KL_WARNINGS, LoopSettings, TrainingLoop
from services.trainer.stage import StageParts


class FakeLearner:
    def __init__(self, kl=0.5, algorithm="ppo"):
        self.config = PPOConfig(algorithm=algorithm)
        self.kl = kl
        self.updates = 0
        self.fail_with = None

    def iterate(self, prompts, score, prompt_texts=None, stopping=never):
        if self.fail_with:
            raise self.fail_with
        if stopping():  # as the real learner is asked between steps
            raise Interrupted("update given up on stop after 1 of 4 minibatch steps")
        self.updates += 1
        return {
            "objective/kl": self.kl,
            "objective/kl_coef": 0.1,
            "objective/scores": 0.25,
            "policy/clipfrac": 0.1,
        }


def _loop(tmp_path, learner, intake):
    settings = LoopSettings(batch_size=2, publish_every=1000, metrics_log=tmp_path / "m.jsonl")
    parts = StageParts(intake, mock.Mock(), mock.Mock())
    return TrainingLoop(parts, learner, None, settings, start_version=3)


def _intake_with(gids):
    intake = Intake(mock.Mock(), max_prompt_tokens=8)
    for gid in gids:
        generation = events_pb2.GenerationEvent(generation_id=gid, prompt_token_ids=[1, 2])
        feedback = events_pb2.FeedbackEvent(
            event_id=f"e-{gid}", feedback=events_pb2.Feedback(generation_id=gid, thumb=1)
        )
        intake.handle(bus.Record(bus.GENERATIONS, 0, 0, gid, generation, 0))
        intake.handle(bus.Record(bus.FEEDBACK, 0, 0, gid, feedback, 0))
    return intake


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_an_update_is_logged_as_jsonl_and_its_feedback_counted_as_used(tmp_path, algorithm):
    intake = _intake_with(["a", "b"])
    loop = _loop(tmp_path, FakeLearner(algorithm=algorithm), intake)
    batch, staleness = intake.take(2)
    loop.step(batch, staleness)
    [line] = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert line["step"] == 1 and line["policy_version"] == 3 and line["feedback_used"] == 2
    assert line["objective/kl"] == 0.5 and line["policy/clipfrac"] == 0.1
    assert line["algorithm"] == algorithm
    assert intake.used == Ledger.of(["e-a", "e-b"])
    status = loop.status
    assert status.step == 1 and status.kl == 0.5 and status.feedback_used == 2
    assert status.algorithm == algorithm


def test_a_critic_free_stage_says_how_many_answers_each_prompt_gets(tmp_path):
    intake = _intake_with(["a", "b"])
    loop = _loop(tmp_path, FakeLearner(algorithm="rloo"), intake)
    assert loop.work()  # takes the batch of 2 and trains
    assert loop.status.phase_detail == (
        "rloo on batches of 2 prompts with feedback, 4 answers each"
    )
    assert loop.status.algorithm == "rloo"


@pytest.mark.parametrize("kl, kind", [(-0.5, "negative"), (80.0, "exploded")])
def test_negative_or_exploding_kl_is_warned_about_and_counted(tmp_path, caplog, kl, kind):
    intake = _intake_with(["a", "b"])
    loop = _loop(tmp_path, FakeLearner(kl=kl), intake)
    before = KL_WARNINGS.labels(kind)._value.get()
    with caplog.at_level(logging.WARNING):
        loop.step(*intake.take(2))
    assert KL_WARNINGS.labels(kind)._value.get() == before + 1
    assert any(kind in r.getMessage() for r in caplog.records)


def test_small_sampling_noise_below_zero_is_not_a_warning(tmp_path, caplog):
    intake = _intake_with(["a", "b"])
    loop = _loop(tmp_path, FakeLearner(kl=-0.01), intake)
    with caplog.at_level(logging.WARNING):
        loop.step(*intake.take(2))
    assert not caplog.records


def test_a_batch_is_put_back_unused_when_the_reward_service_is_down(tmp_path):
    intake = _intake_with(["a", "b"])
    learner = FakeLearner()
    learner.fail_with = RewardUnavailable("down")
    loop = _loop(tmp_path, learner, intake)
    assert loop.step(*intake.take(2)) is None
    assert len(intake) == 2 and intake.used.count == 0


def test_an_iteration_given_up_on_stop_puts_its_batch_back_and_is_no_failure(tmp_path, caplog):
    intake = _intake_with(["a", "b"])
    learner = FakeLearner()
    loop = _loop(tmp_path, learner, intake)
    failed = FAILED_BATCHES._value.get()
    loop.stop()  # the stage's stop, as SIGTERM asks it (its thread never started here)
    with caplog.at_level(logging.INFO, logger="services.trainer.ppo.loop"):
        assert loop.work()  # took the batch and gave it up
    assert len(intake) == 2 and intake.used.count == 0 and learner.updates == 0
    assert FAILED_BATCHES._value.get() == failed
    assert not (tmp_path / "m.jsonl").exists()
    assert "iteration given up on stop (update given up on stop after 1 of 4" in caplog.text


def test_the_status_counts_prompts_dropped_untrained(tmp_path):
    intake = Intake(mock.Mock(), max_prompt_tokens=8, max_staleness_seconds=60, newest_first=True)
    for gid, age in (("old", 90), ("new", 5)):
        generation = events_pb2.GenerationEvent(generation_id=gid, prompt_token_ids=[1, 2])
        generation.created_at.FromSeconds(int(time.time()) - age)
        feedback = events_pb2.FeedbackEvent(
            event_id=f"e-{gid}", feedback=events_pb2.Feedback(generation_id=gid, thumb=1)
        )
        intake.handle(bus.Record(bus.GENERATIONS, 0, 0, gid, generation, 0))
        intake.handle(bus.Record(bus.FEEDBACK, 0, 0, gid, feedback, 0))
    loop = _loop(tmp_path, FakeLearner(), intake)
    assert loop.status.dropped_prompts == 0 and loop.status.pending_prompts == 2
    batch, _ = intake.take(2)
    assert [j.generation.generation_id for j in batch] == ["new"]
    assert loop.status.dropped_prompts == 1 and loop.status.pending_prompts == 0


def test_reward_rounds_come_at_geometric_sizes_with_round_growth():
    """RLHF_REWARD_ROUND_GROWTH: once a reward model is served, a round waits for the larger of
    RLHF_REWARD_ROUND_EXAMPLES new examples and that fraction of what earlier rounds had; 0
    keeps fixed-size rounds, and so does a stage that has published nothing yet (PPO waits for
    its first model: every round is a chance)."""
    from rlhf.training.reward import FeedbackDataset, Labelled, Rated
    from services.trainer.reward.loop import RewardIntake, RewardRounds

    def rounds_at(growth, total=600, published=1):
        dataset = FeedbackDataset()
        intake = RewardIntake(mock.Mock(), mock.Mock(), dataset, mock.Mock())
        stage = RewardRounds(
            StageParts(intake, mock.Mock(), mock.Mock()), mock.Mock(), 64, published, growth
        )
        sizes = []
        for n in range(1, total + 1):
            dataset.add([Labelled(f"g{n}", Rated("q", "a", 1.0))])
            if stage.due():
                sizes.append(n)
                dataset.snapshot()  # what a round takes: the fresh examples are no longer new
        return sizes

    assert rounds_at(0.0) == [64 * k for k in range(1, 10)]
    assert rounds_at(0.5) == [64, 128, 192, 288, 432]
    assert rounds_at(0.5, published=0) == rounds_at(0.0)
