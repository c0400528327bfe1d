"""The reward service builds models on threads that end, so its forward passes keep the
process's only OpenMP team (rlhf.models.on_own_thread)."""

import threading

import pytest

import services.reward.main as reward_main
from rlhf.checkpoints import REWARD, CheckpointStore
from rlhf.models import TINY, load_reward_backbone, on_own_thread, reward_checkpoint_files
from rlhf.v1 import events_pb2
from services.reward.config import RewardConfig


def test_on_own_thread_returns_the_result_from_a_thread_that_has_ended():
    seen = []
    assert on_own_thread(lambda: seen.append(threading.current_thread()) or 42) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_on_own_thread_raises_what_the_work_raised():
    def fail():
        raise KeyError("broken checkpoint")

    with pytest.raises(KeyError, match="broken checkpoint"):
        on_own_thread(fail)


def test_the_reward_service_builds_its_models_off_the_serving_threads(tmp_path, monkeypatch):
    built_on = []

    def recorded(function):
        def wrapper(*args):
            built_on.append(threading.current_thread())
            return function(*args)

        return wrapper

    monkeypatch.setattr(
        reward_main, "load_reward_backbone", recorded(reward_main.load_reward_backbone)
    )
    monkeypatch.setattr(
        reward_main, "reward_from_checkpoint", recorded(reward_main.reward_from_checkpoint)
    )
    config = RewardConfig(
        kafka_bootstrap="127.0.0.1:9",  # never contacted: the follower is not started
        checkpoint_dir=tmp_path,
        reward_model=TINY,
        drift_sample=0.0,
        dtype="float32",
    )
    service = reward_main.RewardService(config)
    manifest = CheckpointStore(tmp_path).write(
        REWARD, *reward_checkpoint_files(load_reward_backbone(TINY)[0])
    )
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_REWARD,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    assert service.follower.apply(event)  # a hot swap, built as the follower thread would
    assert len(built_on) == 2  # the base model at start, the checkpoint on the swap
    assert all(t is not threading.current_thread() and not t.is_alive() for t in built_on)
    service.batcher.start()
    try:
        scores, version = service.batcher.submit([("How was it?", "great")])
    finally:
        service.batcher.stop()
    assert version == manifest.version and len(scores) == 1
