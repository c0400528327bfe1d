"""A canary on a real generation service and broker: `rlhf release` publishes the split, the
service serves incumbent and candidate side by side, sticky per user key (gRPC and the OpenAI
`user`), ignores checkpoints while releases decide, and promotes without failing a request."""

import threading

import grpc
import pytest
import requests
import torch

from rlhf import bus, cli
from rlhf.canary import bucket
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.models import TINY, load_base_policy, policy_checkpoint_files
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from services.generation.main import GenerationService
from tests.conftest import API_KEY, TENANT, channel, serve, tiny_generation_config, wait_until

SHARE = 0.5


def _write_perturbed(store, cache_dir, scale):
    model = load_base_policy(TINY, cache_dir)
    torch.manual_seed(int(scale * 100))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return store.write(POLICY, *policy_checkpoint_files(model))


@pytest.fixture(scope="module")
def store(tmp_path_factory, cache_dir):
    store = CheckpointStore(tmp_path_factory.mktemp("checkpoints"))
    _write_perturbed(store, cache_dir, 0.2)  # v1
    _write_perturbed(store, cache_dir, 0.4)  # v2
    return store


@pytest.fixture(scope="module")
def service(broker, store, cache_dir):
    config = tiny_generation_config(
        broker, store.root, cache_dir, releases=True, max_new_tokens_limit=16, batch_wait_ms=5.0
    )
    running = serve(GenerationService(config))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(service):
    with channel(service, API_KEY) as opened:
        yield generation_pb2_grpc.GenerationServiceStub(opened)


def _release(broker, store, *argv):
    code = cli.main(
        ["release", *argv, "--kafka", broker.bootstrap, "--checkpoint-dir", str(store.root)]
    )
    assert code == 0


def _serving(stub, incumbent, candidate=0):
    info = stub.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest())
    return (info.version, info.candidate_version) == (incumbent, candidate)


def _request(user="", seed=1):
    return generation_pb2.GenerateRequest(
        prompt="Tell me a story",
        sampling=common_pb2.SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed),
        user_key=user,
    )


def _arm(user):
    return 2 if bucket(f"{TENANT}\x00{user}") < SHARE else 1


def test_a_release_splits_users_between_incumbent_and_candidate(broker, store, stub, service):
    _release(broker, store, "1", "--candidate", "2", "--share", str(SHARE))
    assert wait_until(lambda: _serving(stub, 1, 2))
    info = stub.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest())
    assert info.candidate_share == pytest.approx(SHARE)
    users = [f"user-{i}" for i in range(12)]
    assert {_arm(user) for user in users} == {1, 2}  # the users span both arms
    for user in users:
        versions = {stub.Generate(_request(user, seed)).policy_version for seed in (1, 2)}
        assert versions == {_arm(user)}, user
    keyless = {stub.Generate(_request(seed=seed)).policy_version for seed in range(24)}
    assert keyless == {1, 2}
    # The OpenAI `user` is the same key.
    url = f"http://127.0.0.1:{service.service.http.port}/v1/chat/completions"
    for user in users[:4]:
        reply = requests.post(
            url,
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={
                "model": TINY,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "user": user,
            },
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["policy_version"] == _arm(user)


def test_checkpoints_wait_for_a_release(broker, store, stub, cache_dir):
    _release(broker, store, "1", "--candidate", "2", "--share", str(SHARE))
    assert wait_until(lambda: _serving(stub, 1, 2))
    manifest = _write_perturbed(store, cache_dir, 0.6)
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_POLICY,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    with bus.Publisher(broker.bootstrap, client_id="test") as publisher:
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
    # A release that names the new version is what serves it.
    _release(broker, store, "1", "--candidate", str(manifest.version), "--share", "0.0")
    assert wait_until(lambda: _serving(stub, 1, manifest.version))
    assert {stub.Generate(_request(f"user-{i}")).policy_version for i in range(6)} == {1}


def test_promotion_and_rollback_under_load_fail_no_request(broker, store, stub):
    _release(broker, store, "1", "--candidate", "2", "--share", str(SHARE))
    assert wait_until(lambda: _serving(stub, 1, 2))
    stop, failures, seen = threading.Event(), [], []

    names = [f"load-{i}" for i in range(100)]
    users = [u for u in names if _arm(u) == 1][:3] + [u for u in names if _arm(u) == 2][:3]

    def client(index):
        while not stop.is_set():
            user = users[index]
            try:
                seen.append((user, stub.Generate(_request(user, index)).policy_version))
            except grpc.RpcError as exc:
                failures.append(exc.code())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: len(seen) >= 12)
        _release(broker, store, "2", "--reason", "promote")
        assert wait_until(lambda: _serving(stub, 2))
        promoted_at = len(seen)
        assert wait_until(lambda: len(seen) >= promoted_at + 12)
        _release(broker, store, "1", "--reason", "rollback")
        assert wait_until(lambda: _serving(stub, 1))
        rolled_back_at = len(seen)
        assert wait_until(lambda: len(seen) >= rolled_back_at + 12)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert {version for _, version in seen[:12]} == {1, 2}  # the canary split the load
    # Requests admitted after each switch answered by what it named (a few in flight finish
    # on the version they started with).
    assert {version for _, version in seen[promoted_at + 6 : promoted_at + 12]} == {2}
    assert {version for _, version in seen[rolled_back_at + 6 :]} == {1}


def test_a_bad_release_is_refused_and_the_canary_keeps_serving(broker, store, stub):
    _release(broker, store, "1", "--candidate", "2", "--share", str(SHARE))
    assert wait_until(lambda: _serving(stub, 1, 2))
    forged = events_pb2.ReleaseEvent(
        incumbent_version=2,
        candidate_version=1,
        candidate_share=0.5,
        candidate_manifest_sha256="0" * 64,
    )
    with bus.Publisher(broker.bootstrap, client_id="test") as publisher:
        publisher.publish(bus.RELEASES, POLICY, forged)
    # Followed by a good one: the forged one was read (and refused) before it.
    _release(broker, store, "1", "--candidate", "2", "--share", "0.25")
    assert wait_until(
        lambda: stub.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest()).candidate_share == 0.25
    )
    assert _serving(stub, 1, 2)


def test_release_command_refuses_versions_not_in_the_store(broker, store, capsys):
    code = cli.main(
        [
            "release",
            "1",
            "--candidate",
            "99",
            "--kafka",
            broker.bootstrap,
            "--checkpoint-dir",
            str(store.root),
        ]
    )
    assert code == cli.EXIT_USAGE
    assert "99" in capsys.readouterr().err
