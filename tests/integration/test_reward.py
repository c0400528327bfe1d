"""The reward service: batched scores from the served reward model, hot reloaded, and the live
reward of sampled generations (drift)."""

import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from rlhf import bus
from rlhf.checkpoints import REWARD, CheckpointStore
from rlhf.models import (
    CONFIG_FILE,
    NORMALISATION,
    TINY,
    load_reward_backbone,
    reward_checkpoint_files,
    set_reward_normalisation,
)
from rlhf.v1 import events_pb2, reward_pb2, reward_pb2_grpc
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from services.simulated_users.synthetic import generation_event
from tests.conftest import SERVICE_KEY, channel, scrape, serve, wait_until


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CheckpointStore(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def stub(broker, store):
    config = RewardConfig(
        kafka_bootstrap=broker.bootstrap,
        checkpoint_dir=store.root,
        reward_model=TINY,
        max_batch=4,
        drift_sample=0.0,
        dtype="float32",  # exact scores (bfloat16 scoring: tests/unit/test_score_batcher.py)
    )
    running = serve(RewardService(config))
    with channel(running, SERVICE_KEY) as opened:
        yield reward_pb2_grpc.RewardServiceStub(opened)
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


def _announce(broker, manifest):
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_REWARD,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    with bus.Publisher(broker.bootstrap, client_id="test") as publisher:
        publisher.publish(bus.REWARD_CHECKPOINTS, REWARD, event)


def test_new_reward_checkpoint_changes_scores(stub, broker, store):
    before = stub.Score(_pairs("great, thanks")).scores[0]
    model, _ = load_reward_backbone(TINY)
    with torch.no_grad():
        model.classifier.bias.add_(5.0)
    manifest = store.write(REWARD, *reward_checkpoint_files(model))
    _announce(broker, manifest)
    assert wait_until(lambda: stub.Score(_pairs("x")).model_version == manifest.version)
    assert stub.Score(_pairs("great, thanks")).scores[0] == pytest.approx(before + 5.0, abs=1e-3)


def test_the_checkpoints_normalisation_is_applied_to_served_scores(stub, broker, store):
    base, _ = load_reward_backbone(TINY)
    raw = stub.Score(_pairs("great, thanks", "awful")).scores  # v1: base + 5
    model, _ = load_reward_backbone(TINY)
    with torch.no_grad():
        model.classifier.bias.add_(5.0)
    set_reward_normalisation(model, shift=5.0, scale=2.0)
    manifest = store.write(REWARD, *reward_checkpoint_files(model))
    _announce(broker, manifest)
    assert wait_until(lambda: stub.Score(_pairs("x")).model_version == manifest.version)
    served = stub.Score(_pairs("great, thanks", "awful")).scores
    assert served == pytest.approx([(r - 5.0) / 2.0 for r in raw], abs=1e-3)


def _refused():
    labels = {"kind": REWARD, "outcome": "refused"}
    return REGISTRY.get_sample_value("rlhf_checkpoint_reloads_total", labels) or 0.0


def test_a_checkpoint_with_a_broken_normalisation_is_refused(stub, broker, store):
    serving = stub.Score(_pairs("x")).model_version
    model, _ = load_reward_backbone(TINY)
    tensors, json_files = reward_checkpoint_files(model)
    json_files[CONFIG_FILE][NORMALISATION] = {"shift": 0.0, "scale": -1.0}
    manifest = store.write(REWARD, tensors, json_files)
    refused = _refused()
    _announce(broker, manifest)
    # A good checkpoint after it: once that is served, the bad one was read (one partition,
    # in order) and must have been refused, the old model serving meanwhile.
    good = store.write(REWARD, *reward_checkpoint_files(load_reward_backbone(TINY)[0]))
    _announce(broker, good)
    versions = set()
    assert wait_until(
        lambda: versions.add(stub.Score(_pairs("x")).model_version) or good.version in versions,
        interval=0.02,
    )
    assert manifest.version not in versions and serving in versions
    assert _refused() >= refused + 1


@pytest.fixture
def coalescing(broker, tmp_path):
    """A service whose batches wait up to a second for calls already on their way."""
    config = RewardConfig(
        kafka_bootstrap=broker.bootstrap,
        checkpoint_dir=tmp_path,
        reward_model=TINY,
        batch_max_pairs=4,
        batch_wait_ms=1000.0,
        drift_sample=0.0,
        dtype="float32",
    )
    running = serve(RewardService(config))
    with channel(running, SERVICE_KEY) as opened:
        yield reward_pb2_grpc.RewardServiceStub(opened)
    running.stop()


def _batches():
    return REGISTRY.get_sample_value("rlhf_reward_batch_requests_count") or 0.0


def test_concurrent_calls_are_coalesced_into_one_forward_pass(coalescing):
    texts = ["great", "awful", "fine", "so-so"] * 2
    before = _batches()
    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        replies = list(pool.map(lambda t: coalescing.Score(_pairs(t), timeout=30), texts))
    # A lone call is scored at once (no one else on the way); the calls that arrive meanwhile
    # share forward passes of up to four pairs: eight concurrent calls, fewer passes.
    passes = _batches() - before
    assert 2 <= passes < len(texts)
    # Batched together or alone, a pair gets the same score.
    together = [reply.scores[0] for reply in replies]
    alone = coalescing.Score(_pairs(*texts), timeout=30).scores
    assert together == pytest.approx(list(alone), abs=1e-5)


@pytest.fixture
def drifting(broker, tmp_path):
    """A service scoring every live generation, in a consumer group of its own."""
    config = RewardConfig(
        kafka_bootstrap=broker.bootstrap,
        checkpoint_dir=tmp_path,
        reward_model=TINY,
        drift_sample=1.0,
        drift_group=f"drift-{uuid.uuid4().hex[:8]}",
        max_poll_interval_ms=4000,
    )
    running = serve(RewardService(config))
    yield running
    running.stop()


def test_live_generations_are_scored_per_policy_version(drifting, broker):
    assert wait_until(drifting.service.drift.ready, timeout=60)
    rng = random.Random(5)
    version = rng.randrange(1000, 10**6)  # a policy version no other test publishes
    events = [
        generation_event("How was your weekend?", f"It was fine {i}.", version, rng)
        for i in range(6)
    ]
    with bus.Publisher(broker.bootstrap, client_id="test-drift") as publisher:
        for event in events:
            publisher.publish(bus.GENERATIONS, event.generation_id, event)
    count = f'rlhf_reward_live_count{{policy_version="{version}",reward_version="0"}} 6.0'
    assert wait_until(lambda: count in scrape(drifting), timeout=30), scrape(drifting)[-3000:]
    assert f'rlhf_reward_live_score_bucket{{le="+Inf",policy_version="{version}"' in scrape(
        drifting
    )
