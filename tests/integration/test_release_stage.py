"""The release stage on a real broker: it pins what generation serves, gives each new policy a
canary, rolls back one users like less and promotes one they like more (from thumbs events with
the versions that wrote the answers), obeys an operator's override (operator key only), and
resumes its canary after a restart."""

import contextlib
import random
import uuid

import grpc
import pytest
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from rlhf import bus, cli
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc
from services.trainer.main import build
from tests.conftest import (
    OPERATOR_KEY,
    READER_KEY,
    channel,
    released,
    serve,
    trainer_config,
    wait_until,
)

SHARE = 0.2


def _policy(store, version):
    manifest = store.write(POLICY, {"model.safetensors": {"w": torch.full((2,), float(version))}})
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_POLICY,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    return manifest, event


def _thumbs(publisher, rates, count, rng):
    """`count` thumbs per version, up with that version's rate, received now."""
    now = Timestamp()
    now.GetCurrentTime()
    for version, rate in rates.items():
        for _ in range(count):
            gid = f"g-{uuid.uuid4().hex}"
            event = events_pb2.FeedbackEvent(
                received_at=now,
                event_id=f"f-{gid}",
                tenant="tests",
                policy_version=version,
                feedback=events_pb2.Feedback(
                    generation_id=gid,
                    thumb=events_pb2.THUMB_UP if rng.random() < rate else events_pb2.THUMB_DOWN,
                ),
            )
            publisher.publish_async(bus.FEEDBACK, gid, event)
    publisher.flush()


@pytest.fixture
def started(own_broker, tmp_path):
    """(broker, store, start): start() runs a release stage on the store; the caller stops it."""
    store = CheckpointStore(tmp_path / "checkpoints")
    group = f"release-{uuid.uuid4().hex[:8]}"

    def start(**settings):
        config = trainer_config(
            {"kafka_bootstrap": own_broker.bootstrap, "checkpoint_dir": store.root},
            RLHF_TRAINER_STAGE="release",
            RLHF_RELEASE_TRAINER_GROUP=group,
            RLHF_CANARY_SHARE=SHARE,
            RLHF_RELEASE_MIN_THUMBS=60,
            RLHF_KAFKA_MAX_POLL_INTERVAL_MS=4000,
            # These "policies" are stand-in tensors, no model to sample: the bookkeeping of
            # canaries is tested here, the gate (which samples policies) in the e2e test.
            RLHF_RELEASE_GATE="false",
            **settings,
        )
        return serve(build(config))

    return own_broker, store, start


def _status(control):
    return control.GetStatus(trainer_pb2.GetStatusRequest()).release


@contextlib.contextmanager
def _serving_v1(started, **settings):
    """A release stage (with `settings`) started on a store holding v1, once it serves v1;
    yields (its control stub, a publisher), and stops it after the caller's checks."""
    broker, store, start = started
    _policy(store, 1)
    server = start(**settings)
    try:
        with (
            channel(server, READER_KEY) as opened,
            bus.Publisher(broker.bootstrap, client_id="release-test") as publisher,
        ):
            control = trainer_pb2_grpc.TrainerServiceStub(opened)
            assert wait_until(lambda: _status(control).incumbent_version == 1)
            yield control, publisher
    finally:
        server.stop()


def test_canaries_are_rolled_back_or_promoted_by_thumbs_and_by_operators(started, capsys):
    broker, store, start = started
    _policy(store, 1)
    rng = random.Random(7)
    server = start()
    try:
        with (
            channel(server, OPERATOR_KEY) as opened,
            channel(server, READER_KEY) as read_only,
            bus.Publisher(broker.bootstrap, client_id="release-test") as publisher,
        ):
            control = trainer_pb2_grpc.TrainerServiceStub(opened)
            # 1. What generation started on is pinned.
            initial = (1, 0, "initial: what generation started on")
            assert wait_until(lambda: released(broker.bootstrap) == [initial])
            assert wait_until(lambda: _status(control).incumbent_version == 1)
            # No canary: nothing to decide.
            with pytest.raises(grpc.RpcError) as refused:
                control.Decide(
                    trainer_pb2.DecideRequest(verdict=trainer_pb2.RELEASE_VERDICT_PROMOTE)
                )
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            # 2. A new policy gets a canary; users like it less: rolled back.
            _, event = _policy(store, 2)
            publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
            assert wait_until(lambda: _status(control).candidate_version == 2)
            status = _status(control)
            assert (status.incumbent_version, status.candidate_share) == (1, SHARE)
            assert status.verdict == "collecting"
            _thumbs(publisher, {1: 0.8, 2: 0.3, 9: 0.0}, 30, rng)  # v9: neither, not counted
            assert wait_until(lambda: _status(control).candidate_thumbs == 30)
            assert _status(control).verdict == "collecting"  # below the minimum of 60
            _thumbs(publisher, {1: 0.8, 2: 0.3}, 90, rng)
            assert wait_until(lambda: _status(control).candidate_version == 0)
            status = _status(control)
            assert status.incumbent_version == 1
            assert "v2 rolled back" in status.last_decision and "test" in status.last_decision
            assert released(broker.bootstrap)[-2:] == [(1, 2, "canary"), (1, 0, "rollback (test)")]

            # 3. The next policy, liked more: promoted. v2 is never tried again.
            _, event = _policy(store, 3)
            publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
            assert wait_until(lambda: _status(control).candidate_version == 3)
            _thumbs(publisher, {1: 0.5, 3: 0.9}, 120, rng)
            assert wait_until(lambda: _status(control).incumbent_version == 3)
            assert "v3 promoted over v1" in _status(control).last_decision
            assert released(broker.bootstrap)[-1] == (3, 0, "promote (test)")

            # 4. An operator overrides a canary; a reader may look but not decide.
            _, event = _policy(store, 4)
            publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
            assert wait_until(lambda: _status(control).candidate_version == 4)
            reader = trainer_pb2_grpc.TrainerServiceStub(read_only)
            assert reader.GetStatus(trainer_pb2.GetStatusRequest()).release.candidate_version == 4
            with pytest.raises(grpc.RpcError) as denied:
                reader.Decide(
                    trainer_pb2.DecideRequest(verdict=trainer_pb2.RELEASE_VERDICT_ROLLBACK)
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # `rlhf rollback` without a version is the canary's (operator key).
            where = ["--release-trainer", f"127.0.0.1:{server.port}", "--env-file", "/nonexistent"]
            assert cli.main(["rollback", *where, "--operator-key", READER_KEY]) == cli.EXIT_FAILED
            assert "operator key" in capsys.readouterr().err
            code = cli.main(["rollback", *where, "--operator-key", OPERATOR_KEY])
            printed = capsys.readouterr()
            assert code == 0, printed.err
            assert "v4 rolled back, v3 kept (rollback, operator" in printed.out
            assert wait_until(lambda: _status(control).candidate_version == 0)
            assert released(broker.bootstrap)[-1] == (3, 0, "rollback (operator)")

            # 5. A canary in progress survives a restart, its thumbs counted once.
            _, event = _policy(store, 5)
            publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
            assert wait_until(lambda: _status(control).candidate_version == 5)
            _thumbs(publisher, {3: 0.5, 5: 0.5}, 20, rng)
            assert wait_until(lambda: _status(control).candidate_thumbs == 20)
        server.stop()
        server = start()
        with channel(server, OPERATOR_KEY) as opened:
            control = trainer_pb2_grpc.TrainerServiceStub(opened)
            assert wait_until(lambda: _status(control).candidate_thumbs == 20)
            status = _status(control)
            assert (status.incumbent_version, status.candidate_version) == (3, 5)
            assert status.incumbent_thumbs == 20
            assert "v4 rolled back" in status.last_decision
        assert released(broker.bootstrap)[-1] == (3, 5, "canary")  # nothing published again
    finally:
        server.stop()


def test_on_an_empty_store_the_base_policy_is_released_once(started):
    """A fresh platform serves the base model (v0): the stage pins it with one release, not one
    per loop turn until it reads its own release back (make up published 235 in 2 s)."""
    broker, _, start = started
    server = start()
    try:
        with channel(server, READER_KEY) as opened:
            control = trainer_pb2_grpc.TrainerServiceStub(opened)

            def phase():
                return control.GetStatus(trainer_pb2.GetStatusRequest()).phase_detail

            assert wait_until(lambda: phase() == "serving v0; no newer policy")
        assert released(broker.bootstrap) == [(0, 0, "initial: what generation started on")]
    finally:
        server.stop()


def test_a_policy_that_republishes_the_incumbent_or_is_gone_gets_no_canary(started):
    """After a rollback the ppo stage publishes the incumbent's weights as a new version
    (RLHF_PPO_FOLLOW_ROLLBACKS, or an operator's rollback): nothing new for users, so the stage
    skips it, and the next trained policy is the next candidate."""
    broker, store, _ = started
    with _serving_v1(started) as (control, publisher):
        again = store.write(
            POLICY,
            {"model.safetensors": {"w": torch.full((2,), 1.0)}},
            metadata={"rolled_back_from": 1},
        )
        event = events_pb2.CheckpointEvent(
            kind=events_pb2.CHECKPOINT_KIND_POLICY,
            version=again.version,
            path=again.path,
            manifest_sha256=again.sha256,
        )
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
        skipped = "v2 skipped: the weights of v1 again"
        assert wait_until(lambda: _status(control).last_decision == skipped)
        assert _status(control).candidate_version == 0
        # A policy pruned by its writer before its canary (make up's ppo stage published
        # 13 versions while one gate ran): counted as tried, said, and the stage goes on.
        _, pruned = _policy(store, 3)
        _, trained = _policy(store, 4)
        assert store.discard(POLICY, 3)
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, pruned)
        assert wait_until(lambda: "v3 is gone before its canary" in _status(control).last_decision)
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, trained)
        assert wait_until(lambda: _status(control).candidate_version == 4)
    assert released(broker.bootstrap) == [
        (1, 0, "initial: what generation started on"),
        (1, 4, "canary"),
    ]


def test_a_policy_gets_its_canary_once_it_is_min_ahead_versions_past_the_incumbent(started):
    """RLHF_RELEASE_MIN_AHEAD=3: policies one or two updates past the incumbent wait (the status
    says why); the first one three versions past gets the canary, and both versions serving are
    pinned in the store."""
    broker, store, _ = started
    with _serving_v1(started, RLHF_RELEASE_MIN_AHEAD=3) as (control, publisher):
        for version in (2, 3):
            _, event = _policy(store, version)
            publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
        waiting = "serving v1; v3 waits until it is 3 versions ahead (RLHF_RELEASE_MIN_AHEAD)"
        assert wait_until(
            lambda: control.GetStatus(trainer_pb2.GetStatusRequest()).phase_detail == waiting
        )
        assert _status(control).candidate_version == 0
        _, event = _policy(store, 4)
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
        assert wait_until(lambda: _status(control).candidate_version == 4)
        # The incumbent and the candidate are pinned: the ppo stage's pruning (all but its
        # newest few) cannot delete them while they serve.
        assert wait_until(lambda: store.pinned(POLICY) == {1, 4})
        for version in (5, 6):
            _policy(store, version)
        assert store.prune(POLICY, keep=1) == [2, 3, 5]
    assert released(broker.bootstrap)[-1] == (1, 4, "canary")
