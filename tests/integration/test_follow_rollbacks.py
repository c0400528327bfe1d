"""The ppo stage follows the release stage's rollbacks (RLHF_PPO_FOLLOW_ROLLBACKS): real broker,
a real ppo stage over loopback, release events as the release stage publishes them."""

import time

import pytest
import torch

from rlhf import bus
from rlhf.canary import release_event
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.models import TINY, load_base_policy, policy_from_checkpoint
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.ppo.service import PPOTrainerService
from tests.conftest import channels_to, serve, trainer_config, wait_until


@pytest.fixture
def ppo_stage(broker, cache_dir, tmp_path):
    """Starts a ppo stage following rollbacks (call again for a restart on the same store)."""
    common = {
        "kafka_bootstrap": broker.bootstrap,
        "checkpoint_dir": tmp_path / "checkpoints",
        "cache_dir": cache_dir,
    }
    running = []

    def start():
        for server, channel in running:  # one stage at a time: stop the previous one first
            channel.close()
            server.stop()
        running.clear()
        server = serve(
            PPOTrainerService(
                trainer_config(
                    common,
                    RLHF_POLICY_MODEL=TINY,
                    RLHF_REWARD_ADDRESS="127.0.0.1:9",  # no reward service: ppo waits, no update
                    RLHF_TRAINER_GROUP="follow-rollbacks",
                    RLHF_PPO_FOLLOW_ROLLBACKS="true",
                )
            )
        )
        channel = channels_to({"trainer": server})["trainer"]
        running.append((server, channel))
        return trainer_pb2_grpc.TrainerServiceStub(channel)

    yield start, CheckpointStore(common["checkpoint_dir"]), cache_dir
    for server, channel in running:
        channel.close()
        server.stop()


def _release(bootstrap, store, incumbent, candidate=0, reason=""):
    event = release_event(store, POLICY, incumbent, candidate, 0.5 if candidate else 0.0, reason)
    with bus.Publisher(bootstrap, client_id="test-release") as publisher:
        publisher.publish(bus.RELEASES, POLICY, event)


def _head(trainer) -> int:
    return trainer.GetStatus(trainer_pb2.GetStatusRequest()).policy_version


def test_a_rolled_back_canary_sends_the_ppo_stage_back_to_the_incumbent(broker, ppo_stage):
    start, store, cache_dir = ppo_stage
    trainer = start()
    for expected in (1, 2):  # the stage's line: v1, then v2
        assert trainer.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=60).version == expected

    _release(broker.bootstrap, store, 1, 2, "canary")  # v2 against v1: nothing to follow yet
    _release(broker.bootstrap, store, 1, 0, "rollback (test)")  # the test rolls v2 back
    assert wait_until(lambda: _head(trainer) == 3, timeout=30)
    manifest, _ = store.read_manifest(POLICY, 3)
    assert manifest.metadata["rolled_back_from"] == 1 and manifest.parent_version == 2
    listed = trainer.ListCheckpoints(trainer_pb2.ListCheckpointsRequest(limit=1))
    assert listed.checkpoints[0].rolled_back_from == 1

    # A restart replays the release topic from its start: the rollback above is history, not
    # followed again (it would send the stage back to v1 on every restart). The stage resumes
    # from the newest policy: here one whose weights differ from the base model's (v4).
    _write_policy(store, parent=3, nudge=0.5)
    trainer = start()
    assert _head(trainer) == 4
    assert trainer.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=60).version == 5
    time.sleep(3)  # time enough for the replayed events to be handled
    assert _head(trainer) == 5 and store.latest_version(POLICY) == 5
    assert "rolled_back_from" not in store.read_manifest(POLICY, 5)[0].metadata

    # A canary against the base model, expired: the stage trains on from v0's weights.
    _release(broker.bootstrap, store, 0, 5, "canary")
    _release(broker.bootstrap, store, 0, 0, "expired (test)")
    assert wait_until(lambda: _head(trainer) == 6, timeout=60)
    assert store.read_manifest(POLICY, 6)[0].metadata["rolled_back_from"] == 0
    base = load_base_policy(TINY, cache_dir).state_dict()
    before = policy_from_checkpoint(store.load(POLICY, 5)).state_dict()
    after = policy_from_checkpoint(store.load(POLICY, 6)).state_dict()
    assert not all(torch.equal(base[name], before[name]) for name in base)
    assert all(torch.equal(base[name], after[name]) for name in base)


def _write_policy(store: CheckpointStore, parent: int, nudge: float = 0.0) -> int:
    """A copy of policy `parent` as the next version (another writer's), its weights nudged."""
    loaded = store.load(POLICY, parent)
    tensors = {
        file: {name: tensor.clone() + nudge for name, tensor in state.items()}
        for file, state in loaded.tensors.items()
    }
    return store.write(POLICY, tensors, loaded.json_files, parent_version=parent).version


def test_a_rollback_of_a_policy_this_stage_never_reached_is_not_followed(broker, ppo_stage):
    start, store, _ = ppo_stage
    trainer = start()
    assert trainer.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=60).version == 1
    # Another writer's v2 and v3 (an sft run, say): their canary is not this stage's line.
    assert [_write_policy(store, parent) for parent in (1, 2)] == [2, 3]
    _release(broker.bootstrap, store, 2, 3, "canary")
    _release(broker.bootstrap, store, 2, 0, "rollback (test)")  # v3 rolled back, v2 kept
    time.sleep(3)
    assert _head(trainer) == 1 and store.latest_version(POLICY) == 3
