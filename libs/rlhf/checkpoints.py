"""The checkpoint store: safetensors and JSON files plus a manifest of their sha256 hashes.

Layout: `<root>/<kind>/v00000007/{manifest.json, *.safetensors, *.json}`. A checkpoint is
written into a hidden temporary folder and renamed into place, so serving pods never see a half
written one. Loading reads each file once, hashes those bytes and deserialises the same bytes, so
what is verified is what is loaded. Only `.safetensors` and `.json` files are accepted: nothing in
the store is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

MANIFEST = "manifest.json"
ALLOWED_SUFFIXES = (".safetensors", ".json")
POLICY = "policy"
REWARD = "reward"
# The PPO trainer's own state (value head, optimizer, join state, offsets), stored under the
# version of the policy it belongs to. Serving pods never read it.
PPO_STATE = "ppo-state"
# The reward and sft stages' state (their join state, training data and the offsets it covers),
# each its own sequence of versions, written after every round. Serving pods never read them.
REWARD_STATE = "reward-state"
SFT_STATE = "sft-state"
KINDS = (POLICY, REWARD, PPO_STATE, REWARD_STATE, SFT_STATE)


class CheckpointError(Exception):
    """A checkpoint is missing, malformed or fails verification."""


class IntegrityError(CheckpointError):
    """A file's hash differs from the manifest, or the manifest from the announced hash."""


@dataclass(frozen=True)
class Manifest:
    kind: str
    version: int
    parent_version: int
    files: dict[str, str]  # file name -> sha256 hex
    created_at: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def path(self) -> str:
        """Location relative to the store root."""
        return f"{self.kind}/{version_dir(self.version)}"


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose every file matched its manifest hash, held in memory."""

    manifest: Manifest
    manifest_sha256: str
    tensors: dict[str, dict[str, torch.Tensor]]  # file name -> state dict
    json_files: dict[str, Any]


def version_dir(version: int) -> str:
    return f"v{version:08d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(name: str) -> None:
    if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(ALLOWED_SUFFIXES):
        raise CheckpointError(f"refusing checkpoint file name {name!r}")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise CheckpointError(f"unknown checkpoint kind {kind!r}")
        return self.root / kind

    def versions(self, kind: str) -> list[int]:
        folder = self._kind_dir(kind)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            if child.name.startswith("v") and child.name[1:].isdigit() and child.is_dir():
                found.append(int(child.name[1:]))
        return sorted(found)

    def latest_version(self, kind: str) -> int | None:
        versions = self.versions(kind)
        return versions[-1] if versions else None

    def write(
        self,
        kind: str,
        tensors: dict[str, dict[str, torch.Tensor]],
        json_files: dict[str, Any] | None = None,
        parent_version: int = 0,
        version: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write a checkpoint atomically and return its manifest."""
        folder = self._kind_dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        if version is None:
            version = (self.latest_version(kind) or 0) + 1
        final = folder / version_dir(version)
        if final.exists():
            raise CheckpointError(f"{kind} version {version} already exists")
        staging = folder / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            hashes: dict[str, str] = {}
            for name, state in tensors.items():
                _check_name(name)
                data = safetensors.torch.save({k: v.contiguous() for k, v in state.items()})
                _write_synced(staging / name, data)
                hashes[name] = _sha256(data)
            for name, content in (json_files or {}).items():
                _check_name(name)
                data = json.dumps(content, sort_keys=True).encode()
                _write_synced(staging / name, data)
                hashes[name] = _sha256(data)
            manifest = Manifest(
                kind=kind,
                version=version,
                parent_version=parent_version,
                files=hashes,
                created_at=time.time(),
                metadata=metadata or {},
            )
            _write_synced(staging / MANIFEST, manifest.to_bytes())
            _fsync_dir(staging)
            os.rename(staging, final)
            _fsync_dir(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def prune(self, kind: str, keep: int, protect: frozenset[int] = frozenset()) -> list[int]:
        """Delete all but the newest `keep` versions and those in `protect`."""
        folder = self._kind_dir(kind)
        older = self.versions(kind)[:-keep] if keep > 0 else []
        doomed = [v for v in older if v not in protect]
        for version in doomed:
            shutil.rmtree(folder / version_dir(version), ignore_errors=True)
        return doomed

    def discard(self, kind: str, version: int) -> bool:
        """Delete one version if it exists (e.g. trainer state left by a crash before its
        policy was written); True if there was one."""
        folder = self._kind_dir(kind) / version_dir(version)
        if not folder.is_dir():
            return False
        # Renamed away first, so no reader ever sees a half-deleted checkpoint.
        doomed = folder.with_name(f".tmp-{uuid.uuid4().hex}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def read_manifest(self, kind: str, version: int) -> tuple[Manifest, str]:
        path = self._kind_dir(kind) / version_dir(version) / MANIFEST
        try:
            data = path.read_bytes()
            raw = json.loads(data)
            manifest = Manifest(**raw)
        except FileNotFoundError as exc:
            raise CheckpointError(f"no {kind} checkpoint version {version}") from exc
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"malformed manifest {path}: {exc}") from exc
        if manifest.kind != kind or manifest.version != version:
            raise IntegrityError(f"manifest {path} describes {manifest.kind} v{manifest.version}")
        return manifest, _sha256(data)

    def load(
        self, kind: str, version: int, expected_manifest_sha256: str | None = None
    ) -> VerifiedCheckpoint:
        """Read and verify a checkpoint; raises IntegrityError on any mismatch."""
        manifest, manifest_sha = self.read_manifest(kind, version)
        if expected_manifest_sha256 and manifest_sha != expected_manifest_sha256:
            raise IntegrityError(
                f"{kind} v{version}: manifest sha256 {manifest_sha[:12]} differs from the "
                f"announced {expected_manifest_sha256[:12]}"
            )
        folder = self._kind_dir(kind) / version_dir(version)
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        json_files: dict[str, Any] = {}
        for name, expected in manifest.files.items():
            _check_name(name)
            try:
                data = (folder / name).read_bytes()
            except FileNotFoundError as exc:
                raise IntegrityError(f"{kind} v{version}: missing file {name}") from exc
            if _sha256(data) != expected:
                raise IntegrityError(f"{kind} v{version}: sha256 mismatch for {name}")
            if name.endswith(".safetensors"):
                tensors[name] = safetensors.torch.load(data)
            else:
                json_files[name] = json.loads(data)
        return VerifiedCheckpoint(manifest, manifest_sha, tensors, json_files)
