"""Serving pods that fail and recover: a checkpoint follower that fails unexpectedly makes its
service NOT_SERVING until it recovers; a bad newest checkpoint at start-up is skipped for the
last good one instead of a crash loop. Real broker, real gRPC servers."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf import bus, serving
from rlhf.checkpoints import REWARD, CheckpointStore, version_dir
from rlhf.models import TINY, load_reward_backbone, reward_checkpoint_files, reward_from_checkpoint
from rlhf.serving import CheckpointFollower, HotSwap, Served
from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from services.trainer.stage import announce
from tests.conftest import READER_KEY, channel, serve, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Follows:
    """A service whose only work is following reward checkpoints, healthy as its follower."""

    name = "follows"

    def __init__(self, follower: CheckpointFollower) -> None:
        self.follower = follower

    def register(self, server: grpc.Server) -> list[str]:
        return []

    def start(self) -> None:
        self.follower.start()

    def stop(self) -> None:
        self.follower.stop()

    def healthy(self) -> bool:
        return self.follower.healthy()


def _write_reward(store: CheckpointStore, bootstrap: str) -> int:
    manifest = store.write(REWARD, *reward_checkpoint_files(load_reward_backbone(TINY)[0]))
    with bus.Publisher(bootstrap, client_id="test-recovery") as publisher:
        assert announce(publisher, manifest)
    return manifest.version


def test_a_failing_follower_is_not_serving_until_it_recovers(own_broker, tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "RETRY_SECONDS", 0.5)
    store = CheckpointStore(tmp_path)
    failures = {"left": 2}

    def build(checkpoint):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the device went away")  # not a refused checkpoint: a fault
        return reward_from_checkpoint(checkpoint)

    slot = HotSwap(REWARD, Served(None, 0, "", 0.0))
    follower = CheckpointFollower(
        slot, store, build, own_broker.bootstrap, bus.REWARD_CHECKPOINTS, "test-follower"
    )
    server = serve(Follows(follower))
    seen: list[int] = []
    try:
        with channel(server) as opened:
            health = health_pb2_grpc.HealthStub(opened)

            def status() -> int:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                seen.append(reply)
                return reply

            assert status() == SERVING
            version = _write_reward(store, own_broker.bootstrap)
            assert wait_until(lambda: status() == NOT_SERVING, timeout=20, interval=0.2)
            assert wait_until(lambda: slot.current().version == version, timeout=30)
            assert wait_until(lambda: status() == SERVING, timeout=10, interval=0.2)
            # An event that keeps failing is given up after a few tries: serving again, on
            # what was served.
            failures["left"] = 100
            _write_reward(store, own_broker.bootstrap)
            assert wait_until(lambda: status() == NOT_SERVING, timeout=20, interval=0.2)
            assert wait_until(lambda: status() == SERVING, timeout=30, interval=0.2)
            assert slot.current().version == version
    finally:
        server.stop()
    assert follower._events._thread.is_alive() is False  # stopped, not died


def test_a_bad_newest_checkpoint_at_start_up_falls_back_to_the_last_good_one(broker, tmp_path):
    store = CheckpointStore(tmp_path)
    model = load_reward_backbone(TINY)[0]
    good = store.write(REWARD, *reward_checkpoint_files(model)).version
    bad = store.write(REWARD, *reward_checkpoint_files(model)).version
    weights = next((store.root / REWARD / version_dir(bad)).rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)  # corrupted on disk
    config = RewardConfig(
        kafka_bootstrap=broker.bootstrap,
        checkpoint_dir=store.root,
        reward_model=TINY,
        drift_sample=0.0,
    )
    running = serve(RewardService(config))  # starts, rather than failing on v{bad}
    try:
        with channel(running, READER_KEY) as opened:
            info = reward_pb2_grpc.RewardServiceStub(opened).GetModelInfo(
                reward_pb2.GetModelInfoRequest(), timeout=10
            )
        assert info.version == good < bad
    finally:
        running.stop()


@pytest.mark.parametrize("versions", [[], [1]])
def test_start_up_with_nothing_usable_serves_the_base_model(tmp_path, versions):
    store = CheckpointStore(tmp_path)
    for _ in versions:
        version = store.write(REWARD, *reward_checkpoint_files(load_reward_backbone(TINY)[0]))
        (store.root / REWARD / version_dir(version.version) / "manifest.json").write_text("{}")
    served = serving.latest_or_base(store, REWARD, reward_from_checkpoint, lambda: "base")
    assert (served.model, served.version) == ("base", 0)
