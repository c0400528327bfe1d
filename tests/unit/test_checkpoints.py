import hashlib
import json
import logging
import re

import blake3
import pytest
import torch

from rlhf.checkpoints import POLICY, REWARD, CheckpointError, CheckpointStore, IntegrityError
from rlhf.serving import load_served


def _write(store, version=None, value=1.0):
    return store.write(
        POLICY,
        {"model.safetensors": {"w": torch.full((2, 3), value)}},
        {"config.json": {"hidden": 3}},
        version=version,
    )


def test_round_trip_verifies_and_loads(tmp_path):
    store = CheckpointStore(tmp_path)
    manifest = _write(store)
    assert manifest.version == 1 and store.versions(POLICY) == [1]
    loaded = store.load(POLICY, 1, expected_manifest_sha256=manifest.sha256)
    assert torch.equal(loaded.tensors["model.safetensors"]["w"], torch.ones(2, 3))
    assert loaded.json_files["config.json"] == {"hidden": 3}
    assert _write(store).version == 2 and store.latest_version(POLICY) == 2


def test_a_served_load_logs_its_read_and_build_times(tmp_path, caplog):
    """The stages of a hot reload, for telling where its time goes (BENCHMARKS.md)."""
    store = CheckpointStore(tmp_path)
    manifest = _write(store, value=2.0)

    def build(checkpoint):
        return checkpoint.tensors["model.safetensors"]["w"].sum().item()

    with caplog.at_level(logging.INFO, logger="rlhf.serving"):
        served = load_served(store, POLICY, 1, build, manifest.sha256)
    assert (served.model, served.version, served.manifest_sha256) == (12.0, 1, manifest.sha256)
    assert re.search(
        r"policy v1 read and verified in \d+\.\d{3} s, built in \d+\.\d{3} s", caplog.text
    )


def test_tampered_weights_are_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    manifest = _write(store)
    weights = tmp_path / manifest.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        store.load(POLICY, 1)


def test_manifest_swapped_after_announcement_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    manifest = _write(store)
    path = tmp_path / manifest.path / "manifest.json"
    raw = json.loads(path.read_text())
    raw["metadata"] = {"evil": True}
    path.write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="announced"):
        store.load(POLICY, 1, expected_manifest_sha256=manifest.sha256)


def test_missing_file_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    manifest = _write(store)
    (tmp_path / manifest.path / "config.json").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.load(POLICY, 1)


@pytest.mark.parametrize("name", ["weights.pt", "../escape.json", "model.pkl", ".hidden.json"])
def test_only_safetensors_and_json_names_are_written(tmp_path, name):
    with pytest.raises(CheckpointError):
        CheckpointStore(tmp_path).write(POLICY, {name: {"w": torch.zeros(1)}})


def test_manifest_naming_a_pickle_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    manifest = _write(store)
    path = tmp_path / manifest.path / "manifest.json"
    raw = json.loads(path.read_text())
    raw["files"]["model.bin"] = "0" * 64
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model.bin"):
        store.load(POLICY, 1)


def test_failed_write_leaves_nothing_visible(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError):
        store.write(POLICY, {"model.safetensors": {"w": torch.zeros(1)}}, {"bad.txt": {}})
    assert store.versions(POLICY) == []
    assert list((tmp_path / POLICY).iterdir()) == []


def test_existing_version_is_never_overwritten(tmp_path):
    store = CheckpointStore(tmp_path)
    _write(store, version=3)
    with pytest.raises(CheckpointError, match="exists"):
        _write(store, version=3, value=2.0)
    assert torch.equal(store.load(POLICY, 3).tensors["model.safetensors"]["w"], torch.ones(2, 3))


def test_prune_keeps_the_newest(tmp_path):
    store = CheckpointStore(tmp_path)
    for _ in range(4):
        _write(store)
    assert store.prune(POLICY, keep=2) == [1, 2]
    assert store.versions(POLICY) == [3, 4]


def test_prune_spares_protected_versions(tmp_path):
    store = CheckpointStore(tmp_path)
    for _ in range(5):
        _write(store)
    assert store.prune(POLICY, keep=2, protect=frozenset({2})) == [1, 3]
    assert store.versions(POLICY) == [2, 4, 5]


def test_pinned_versions_survive_any_prune_until_their_owner_unpins_them(tmp_path):
    store = CheckpointStore(tmp_path)
    for _ in range(6):
        _write(store)
    store.pin(POLICY, "release", {1, 3})
    store.pin(POLICY, "other", {2})
    assert store.pinned(POLICY) == {1, 2, 3}
    assert store.prune(POLICY, keep=1) == [4, 5]
    assert store.versions(POLICY) == [1, 2, 3, 6]
    store.pin(POLICY, "release", {3})  # replaces the owner's pins, not the other owner's
    store.pin(POLICY, "other", set())
    assert store.pinned(POLICY) == {3}
    assert store.prune(POLICY, keep=1) == [1, 2]
    assert store.versions(POLICY) == [3, 6]  # the pin files are not versions
    assert store.pinned(REWARD) == frozenset()


def test_a_malformed_pin_stops_pruning_and_owners_are_plain_names(tmp_path):
    store = CheckpointStore(tmp_path)
    for _ in range(3):
        _write(store)
    store.pin(POLICY, "release", {1})
    (tmp_path / POLICY / ".pins" / "release.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed pin file"):
        store.prune(POLICY, keep=1)
    assert store.versions(POLICY) == [1, 2, 3]  # nothing deleted on a guess
    with pytest.raises(CheckpointError, match="pin owner"):
        store.pin(POLICY, "../escape", {1})


def test_discard_removes_one_version_and_reports_whether_it_existed(tmp_path):
    store = CheckpointStore(tmp_path)
    _write(store)
    _write(store)
    assert store.discard(POLICY, 2) and not store.discard(POLICY, 2)
    assert store.versions(POLICY) == [1]
    assert not [p for p in (tmp_path / POLICY).iterdir() if p.name.startswith(".tmp")]


def test_tensors_are_views_of_the_verified_bytes_in_every_dtype(tmp_path):
    store = CheckpointStore(tmp_path)
    state = {
        "f32": torch.randn(5, 7),
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
    }
    manifest = store.write(POLICY, {"model.safetensors": state})
    assert manifest.digest == "blake3"
    loaded = store.load(POLICY, manifest.version, manifest.sha256).tensors["model.safetensors"]
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    # One buffer holds them all: nothing was copied after it was hashed.
    storages = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert len(storages) == 1


def test_checkpoints_from_before_blake3_still_load(tmp_path):
    """A manifest without `digest` lists SHA-256 hashes (stores written by earlier builds)."""
    store = CheckpointStore(tmp_path)
    manifest = _write(store)
    folder = tmp_path / manifest.path
    raw = json.loads((folder / "manifest.json").read_text())
    del raw["digest"]
    raw["files"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in raw["files"]}
    data = json.dumps(raw, sort_keys=True, indent=1).encode()
    (folder / "manifest.json").write_bytes(data)
    loaded = store.load(POLICY, 1, hashlib.sha256(data).hexdigest())
    assert loaded.manifest.digest == "sha256"
    assert torch.equal(loaded.tensors["model.safetensors"]["w"], torch.ones(2, 3))


def test_malformed_safetensors_with_a_valid_hash_is_refused(tmp_path):
    """A writer that hashed garbage (a bug, not tampering) still never gets garbage loaded."""
    store = CheckpointStore(tmp_path)
    manifest = _write(store)
    folder = tmp_path / manifest.path
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
    data = len(header).to_bytes(8, "little") + header.encode() + b"\0" * 16
    (folder / "model.safetensors").write_bytes(data)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["files"]["model.safetensors"] = blake3.blake3(data).hexdigest()
    (folder / "manifest.json").write_bytes(json.dumps(raw, sort_keys=True, indent=1).encode())
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        store.load(POLICY, 1)
