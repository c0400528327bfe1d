"""Canary routing (rlhf.canary): who gets the candidate, what a release event loads, and the
batcher decoding incumbent and candidate side by side (tiny random models)."""

import hashlib
import time

import pytest
import torch

from rlhf.batching import ContinuousBatcher, Job, PolicyWeights
from rlhf.canary import Release, ReleaseFollower, ReleaseSlot, bucket, release_event
from rlhf.checkpoints import POLICY, CheckpointError, CheckpointStore
from rlhf.decoding import Sampling
from rlhf.serving import Served
from rlhf.v1 import events_pb2
from tests.unit.test_batcher import PAD, _alone, _model


def served(version, model="m"):
    return Served(model, version, f"sha-{version}", time.time())


def test_bucket_is_a_fixed_uniform_hash_of_the_key():
    # Pinned values: every replica, every process and every release computes the same ones
    # (Python's own hash() is salted per process and would split users differently per pod).
    assert bucket("tenant\x00user-1") == bucket("tenant\x00user-1")
    # A replica of another release must agree with this one mid-canary: the function is pinned.
    assert bucket("") == 0.8931675160897388
    digest = hashlib.blake2b(b"app\x00user-7", digest_size=8).digest()
    assert bucket("app\x00user-7") == int.from_bytes(digest, "big") / 2**64
    keys = [bucket(f"app\x00user-{i}") for i in range(20_000)]
    assert all(0.0 <= b < 1.0 for b in keys)
    for share in (0.1, 0.5):
        assert sum(b < share for b in keys) / len(keys) == pytest.approx(share, abs=0.01)


def test_a_user_key_sticks_to_one_version_and_the_share_splits_users():
    slot = ReleaseSlot(POLICY, served(3))
    assert slot.served_for("app\x00u", exact=False).version == 3  # no candidate: the incumbent
    slot.apply(Release(served(3), served(5), 0.1))
    users = [f"app\x00user-{i}" for i in range(5000)]
    first = {key: slot.served_for(key, exact=False).version for key in users}
    again = {key: slot.served_for(key, exact=False).version for key in users}
    assert first == again
    on_candidate = {key for key, version in first.items() if version == 5}
    assert len(on_candidate) / len(users) == pytest.approx(0.1, abs=0.015)
    assert on_candidate == {key for key in users if bucket(key) < 0.1}
    # Raising the share keeps those users on the candidate and adds others.
    slot.apply(Release(served(3), served(5), 0.5))
    wider = {key for key in users if slot.served_for(key, exact=False).version == 5}
    assert on_candidate < wider
    assert slot.current().version == 3


def test_requests_without_a_key_are_split_each_on_their_own():
    slot = ReleaseSlot(POLICY, served(3))
    slot.apply(Release(served(3), served(5), 0.3))
    versions = [slot.served_for(None, exact=False).version for _ in range(5000)]
    assert versions.count(5) / len(versions) == pytest.approx(0.3, abs=0.03)


def test_rollouts_decode_on_the_newer_version():
    slot = ReleaseSlot(POLICY, served(7))
    slot.apply(Release(served(7), served(4), 0.0))  # a candidate older than the incumbent
    assert slot.served_for("app\x00u", exact=True).version == 7
    slot.apply(Release(served(7), served(9), 0.0))
    assert slot.served_for(None, exact=True).version == 9
    assert slot.served_for(None, exact=False).version == 7  # share 0: no user gets it


def test_a_release_must_make_sense():
    with pytest.raises(ValueError):
        Release(served(3), served(5), 1.5)
    with pytest.raises(ValueError):
        Release(served(3), served(3), 0.1)


def _store(tmp_path, versions):
    store = CheckpointStore(tmp_path)
    for version in range(1, versions + 1):
        store.write(POLICY, {"model.safetensors": {"w": torch.full((2,), float(version))}})
    return store


class Loads:
    """A `build` that records what it built: the checkpoint's version and manifest hash."""

    def __init__(self):
        self.built = []

    def __call__(self, checkpoint):
        model = ("model", int(checkpoint.tensors["model.safetensors"]["w"][0]))
        self.built.append(model)
        return model


def test_the_follower_loads_what_a_release_names_and_keeps_what_is_loaded(tmp_path):
    store = _store(tmp_path, 3)
    loads = Loads()
    slot = ReleaseSlot(
        POLICY, Served(("model", 1), 1, store.read_manifest(POLICY, 1)[1], time.time())
    )
    follower = ReleaseFollower(slot, store, loads, "127.0.0.1:1", "test")
    assert follower.apply(release_event(store, POLICY, 1, 3, 0.2, "canary"))
    release = slot.release()
    assert (release.incumbent.version, release.candidate.version, release.share) == (1, 3, 0.2)
    assert release.candidate.model == ("model", 3)
    assert release.candidate.manifest_sha256 == store.read_manifest(POLICY, 3)[1]
    # Promotion: v3 alone, from memory (nothing built again).
    assert follower.apply(release_event(store, POLICY, 3, reason="promote"))
    assert slot.release().incumbent.model == ("model", 3) and slot.release().candidate is None
    assert loads.built == [("model", 3)]
    # v1 was dropped by that release: naming it again loads it again.
    assert follower.apply(release_event(store, POLICY, 3, 1, 0.5))
    assert slot.release().candidate.model == ("model", 1)
    assert loads.built == [("model", 3), ("model", 1)]
    # A loaded version whose manifest differs from the announced one is loaded again.
    slot.apply(Release(served(3), None))  # "sha-3" is not v3's manifest
    assert follower.apply(release_event(store, POLICY, 3))
    assert loads.built == [("model", 3), ("model", 1), ("model", 3)]


def test_a_release_that_does_not_verify_is_refused_and_the_previous_one_serves(tmp_path):
    store = _store(tmp_path, 3)
    slot = ReleaseSlot(POLICY, served(1))
    follower = ReleaseFollower(slot, store, Loads(), "127.0.0.1:1", "test")
    assert follower.apply(release_event(store, POLICY, 1, 2, 0.5))
    forged = release_event(store, POLICY, 1, 3, 0.5)
    forged.candidate_manifest_sha256 = "0" * 64
    missing = events_pb2.ReleaseEvent(incumbent_version=1, candidate_version=9, candidate_share=0.5)
    too_much = events_pb2.ReleaseEvent(incumbent_version=1, candidate_version=2, candidate_share=2)
    for event in (forged, missing, too_much):
        assert not follower.apply(event)
        assert slot.release().candidate.version == 2 and slot.release().share == 0.5


def test_release_events_are_built_from_the_store(tmp_path):
    store = _store(tmp_path, 2)
    event = release_event(store, POLICY, 1, 2, 0.25, "canary")
    assert event.incumbent_manifest_sha256 == store.read_manifest(POLICY, 1)[1]
    assert event.candidate_manifest_sha256 == store.read_manifest(POLICY, 2)[1]
    assert event.decided_at.seconds > 0
    alone = release_event(store, POLICY, 2, share=0.25)
    assert (alone.candidate_version, alone.candidate_share) == (0, 0.0)
    with pytest.raises(CheckpointError):
        release_event(store, POLICY, 1, 7, 0.1)
    with pytest.raises(ValueError):
        release_event(store, POLICY, 1, 2, -0.1)


def test_the_batcher_decodes_incumbent_and_candidate_side_by_side():
    incumbent, candidate = _model(0), _model(1)
    slot = ReleaseSlot(POLICY, Served(PolicyWeights(incumbent, incumbent), 1, "", time.time()))
    batcher = ContinuousBatcher(slot, eos_ids=set(), pad_id=PAD, max_batch=8)
    users = [f"app\x00user-{i}" for i in range(8)]
    jobs = [Job([5, 6, 7], Sampling(12, 1.0, seed=i), route_key=key) for i, key in enumerate(users)]
    batcher.start()
    try:
        first = batcher.submit(Job([5, 6, 7], Sampling(30, 1.0, seed=99))).result(30)
        slot.apply(
            Release(
                slot.current(), Served(PolicyWeights(candidate, candidate), 2, "", time.time()), 0.5
            )
        )
        results = [batcher.submit(job) for job in jobs]
        results = [future.result(30) for future in results]
    finally:
        batcher.stop()
    assert first.policy_version == 1
    for job, key, result in zip(jobs, users, results, strict=True):
        expected = 2 if bucket(key) < 0.5 else 1
        assert result.policy_version == expected
        model = candidate if expected == 2 else incumbent
        assert result.completion.token_ids == _alone(model, job)
    assert {result.policy_version for result in results} == {1, 2}  # both arms were used
