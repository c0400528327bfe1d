"""The reward service: batched scores from the served reward model, hot reloaded."""

import grpc
import pytest
import torch

from rlhf import bus
from rlhf.checkpoints import REWARD, CheckpointStore
from rlhf.models import TINY, load_reward_backbone, reward_checkpoint_files
from rlhf.v1 import events_pb2, reward_pb2, reward_pb2_grpc
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from tests.conftest import serve, wait_until


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CheckpointStore(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def stub(broker, store):
    config = RewardConfig(
        kafka_bootstrap=broker.bootstrap, checkpoint_dir=store.root, reward_model=TINY, max_batch=4
    )
    running = serve(RewardService(config))
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)
    running.stop()


def _pairs(*texts):
    return reward_pb2.ScoreRequest(
        pairs=[reward_pb2.ScoredPair(prompt="How are you?", response=t) for t in texts]
    )


def test_one_score_per_pair_independent_of_batching(stub):
    batch = stub.Score(_pairs("great, thanks", "awful", "fine"))
    assert len(batch.scores) == 3 and batch.model_version == 0
    alone = stub.Score(_pairs("awful"))
    assert alone.scores[0] == pytest.approx(batch.scores[1], abs=1e-4)
    assert batch.scores[0] != batch.scores[1]


@pytest.mark.parametrize(
    "request_",
    [
        reward_pb2.ScoreRequest(),
        _pairs("a", "b", "c", "d", "e"),
        reward_pb2.ScoreRequest(pairs=[reward_pb2.ScoredPair(prompt="", response="x")]),
        reward_pb2.ScoreRequest(pairs=[reward_pb2.ScoredPair(prompt="p", response="x" * 20000)]),
    ],
)
def test_bad_batches_are_invalid(stub, request_):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_new_reward_checkpoint_changes_scores(stub, broker, store):
    before = stub.Score(_pairs("great, thanks")).scores[0]
    model, _ = load_reward_backbone(TINY)
    with torch.no_grad():
        model.classifier.bias.add_(5.0)
    manifest = store.write(REWARD, *reward_checkpoint_files(model))
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_REWARD,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    with bus.Publisher(broker.bootstrap, client_id="test") as publisher:
        publisher.publish(bus.REWARD_CHECKPOINTS, REWARD, event)
    assert wait_until(lambda: stub.Score(_pairs("x")).model_version == manifest.version)
    assert stub.Score(_pairs("great, thanks")).scores[0] == pytest.approx(before + 5.0, abs=1e-3)
