"""TGI pods cannot hot-reload: a new policy checkpoint becomes a rolling restart, through the
Kubernetes API (mocked here: no API server can run on this machine)."""

import datetime
from unittest import mock

import torch

from rlhf.backends import tgi_rollout_follower
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.kube import MANIFEST_ANNOTATION, VERSION_ANNOTATION, Rollout, restart_patch
from rlhf.serving import HotSwap, Served
from rlhf.v1 import events_pb2


def _follower(store, api):
    """The follower's verify-then-roll path, fed events by hand (never started: no Kafka)."""
    slot = HotSwap(POLICY, Served(None, 0, "", 0.0))
    follower = tgi_rollout_follower(slot, store, Rollout(api, "tgi", "serving"), "unused", "t")
    return follower, slot


def _checkpoint(store):
    manifest = store.write(POLICY, {"model.safetensors": {"w": torch.ones(2)}})
    return manifest, events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_POLICY,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )


def test_patch_changes_only_pod_template_annotations():
    now = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    patch = restart_patch(7, "abc", now)
    annotations = patch["spec"]["template"]["metadata"]["annotations"]
    assert annotations[VERSION_ANNOTATION] == "7"
    assert annotations[MANIFEST_ANNOTATION] == "abc"
    assert set(patch) == {"spec"} and set(patch["spec"]) == {"template"}


def test_new_checkpoint_patches_the_deployment(tmp_path):
    api = mock.Mock()
    store = CheckpointStore(tmp_path)
    manifest, event = _checkpoint(store)
    follower, slot = _follower(store, api)
    assert follower.apply(event)
    api.patch_namespaced_deployment.assert_called_once()
    kwargs = api.patch_namespaced_deployment.call_args.kwargs
    assert (kwargs["name"], kwargs["namespace"]) == ("tgi", "serving")
    annotations = kwargs["body"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations[VERSION_ANNOTATION] == str(manifest.version)
    assert slot.current().version == manifest.version
    assert not follower.apply(event)  # an old or repeated event rolls nothing
    assert api.patch_namespaced_deployment.call_count == 1


def test_tampered_checkpoint_never_restarts_pods(tmp_path):
    api = mock.Mock()
    store = CheckpointStore(tmp_path)
    manifest, event = _checkpoint(store)
    weights = tmp_path / manifest.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    follower, slot = _follower(store, api)
    assert not follower.apply(event)
    assert slot.current().version == 0
    api.patch_namespaced_deployment.assert_not_called()
