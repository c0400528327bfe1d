"""Canary releases for the generation service: an incumbent and a candidate policy version
served side by side, the candidate answering a share of user requests.

What is served is decided by release events (`events_pb2.ReleaseEvent`, topic
`bus.RELEASES`), not by each new checkpoint: with releases on (RLHF_GENERATION_RELEASES), a
replica starts on the store's newest policy and from then on serves exactly what the newest
release event names. Every replica reads the one-partition topic from the beginning, with no
consumer group, and applies every event in order, so all replicas end on the same release.

Routing is deterministic: a request that carries a user key (the app's tenant and the key it
gives, `GenerateRequest.user_key`, the OpenAI `user`) goes to the candidate when a hash of that
key falls below the share (`bucket`), identically on every replica and for as long as the
release stands, so one user sees one version (and a share raised from 10% to 50% keeps the first
10% where they were). A request without a key is routed on its own, at random. A trainer's
rollout decodes on the newer of the two versions: rollouts are not user traffic, and the
trainer's staleness bound measures against the newest policy.

A switch never fails a request: the version is chosen when a request is admitted into the
running batch (under the batcher's lock), and a running request finishes on the version it
started with; a version no release names any more is freed once its last request finished.
A release naming a version that does not verify is refused (log line and
`rlhf_release_events_total{outcome="refused"}`), and the previous release keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.checkpoints import CheckpointError, CheckpointStore, VerifiedCheckpoint
from rlhf.models import on_own_thread
from rlhf.serving import (
    SERVED_VERSION,
    CheckpointEvents,
    Following,
    Served,
    load_served,
)
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

M = TypeVar("M")

RELEASE_EVENTS = Counter(
    "rlhf_release_events_total", "release events read by a serving replica, by outcome", ["outcome"]
)
CANDIDATE_VERSION = Gauge(
    "rlhf_release_candidate_version",
    "the candidate policy version served beside the incumbent (0: none)",
)
CANDIDATE_SHARE = Gauge(
    "rlhf_release_candidate_share", "share of user requests routed to the candidate"
)


@dataclass(frozen=True)
class RolledBack:
    """A canary that ended without its candidate being promoted (a rollback or an expiry)."""

    candidate: int
    incumbent: int  # the version that went on serving everyone
    decided_at: float  # seconds since the epoch; 0 when the event carries no time


class RollbackWatch:
    """Reads release events in their topic's order and says which end a canary without
    promoting its candidate: the previous release had a candidate, and this one serves the
    previous incumbent alone. A promotion (the candidate alone), a new canary, or an operator's
    release of some other version is not a rollback."""

    def __init__(self) -> None:
        self._previous: tuple[int, int] | None = None  # (incumbent, candidate)

    def see(self, event: events_pb2.ReleaseEvent) -> RolledBack | None:
        previous = self._previous
        self._previous = (event.incumbent_version, event.candidate_version)
        if previous is None or not previous[1] or event.candidate_version:
            return None
        if event.incumbent_version != previous[0]:
            return None
        decided = event.decided_at.ToNanoseconds() / 1e9 if event.HasField("decided_at") else 0.0
        return RolledBack(previous[1], previous[0], decided)


def bucket(key: str) -> float:
    """Where `key` falls in [0, 1): the first 8 bytes of its BLAKE2b digest over 2^64. The same
    on every replica and every run (unlike Python's `hash`, which is salted per process)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class Release(Generic[M]):
    """What answers users: the incumbent, and a candidate for `share` of them."""

    incumbent: Served[M]
    candidate: Served[M] | None = None
    share: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"candidate share must be in [0, 1], got {self.share}")
        if self.candidate is not None and self.candidate.version == self.incumbent.version:
            raise ValueError(f"v{self.incumbent.version} cannot be its own candidate")

    def loaded(self, version: int) -> Served[M] | None:
        for served in (self.incumbent, self.candidate):
            if served is not None and served.version == version:
                return served
        return None


class ReleaseSlot(Generic[M]):
    """The release being served; the batcher asks it which version answers each request."""

    def __init__(self, kind: str, initial: Served[M]) -> None:
        self.kind = kind
        self._release: Release[M] = Release(initial)
        self._lock = threading.Lock()
        self._publish_gauges()

    def current(self) -> Served[M]:
        return self._release.incumbent

    def release(self) -> Release[M]:
        return self._release

    def apply(self, release: Release[M]) -> None:
        with self._lock:
            self._release = release
        self._publish_gauges()

    def served_for(self, key: str | None, exact: bool) -> Served[M]:
        release = self._release  # one read: a concurrent apply cannot mix two releases
        candidate = release.candidate
        if candidate is None:
            return release.incumbent
        if exact:
            return max(release.incumbent, candidate, key=lambda served: served.version)
        where = bucket(key) if key else random.random()
        return candidate if where < release.share else release.incumbent

    def _publish_gauges(self) -> None:
        release = self._release
        SERVED_VERSION.labels(self.kind).set(release.incumbent.version)
        CANDIDATE_VERSION.set(release.candidate.version if release.candidate else 0)
        CANDIDATE_SHARE.set(release.share if release.candidate else 0.0)


class ReleaseFollower(Following, Generic[M]):
    """Applies every release event on `bus.RELEASES` to `slot`, loading (and verifying) the
    versions it names that are not loaded yet. A version the new release does not name is
    dropped from the slot; running requests keep it alive until they finish."""

    def __init__(
        self,
        slot: ReleaseSlot[M],
        store: CheckpointStore,
        build: Callable[[VerifiedCheckpoint], M],
        bootstrap: str,
        client_id: str,
    ) -> None:
        self._slot = slot
        self._store = store
        self._build = build
        self._events = CheckpointEvents(
            bootstrap, bus.RELEASES, client_id, self.apply, events_pb2.ReleaseEvent
        )

    def apply(self, event: events_pb2.ReleaseEvent) -> bool:
        """Serve what `event` names; returns False (and keeps the previous release) if it is
        malformed or a version it names does not load."""
        try:
            incumbent = self._served(event.incumbent_version, event.incumbent_manifest_sha256)
            candidate = (
                self._served(event.candidate_version, event.candidate_manifest_sha256)
                if event.candidate_version
                else None
            )
            release = Release(incumbent, candidate, event.candidate_share if candidate else 0.0)
        except (CheckpointError, ValueError, KeyError, OSError) as exc:
            RELEASE_EVENTS.labels("refused").inc()
            log.error("refusing release %s: %s", _describe(event), exc)
            return False
        self._slot.apply(release)
        RELEASE_EVENTS.labels("applied").inc()
        log.info("now serving release %s", _describe(event))
        return True

    def _served(self, version: int, manifest_sha256: str) -> Served[M]:
        """The loaded version, or the store's, verified against the announced manifest hash."""
        loaded = self._slot.release().loaded(version)
        if loaded is not None and (
            not manifest_sha256
            or not loaded.manifest_sha256
            or loaded.manifest_sha256 == manifest_sha256
        ):
            return loaded
        if version == 0:
            raise ValueError("v0 (the base policy) is served only until a release names another")
        return on_own_thread(
            lambda: load_served(
                self._store, self._slot.kind, version, self._build, manifest_sha256 or None
            )
        )


def _describe(event: events_pb2.ReleaseEvent) -> str:
    if not event.candidate_version:
        return f"v{event.incumbent_version} ({event.reason or 'no reason given'})"
    return (
        f"v{event.incumbent_version} + candidate v{event.candidate_version} at "
        f"{event.candidate_share:.0%} ({event.reason or 'no reason given'})"
    )


def release_event(
    store: CheckpointStore,
    kind: str,
    incumbent: int,
    candidate: int = 0,
    share: float = 0.0,
    reason: str = "",
) -> events_pb2.ReleaseEvent:
    """A release event for versions in `store`, carrying their manifests' hashes so every
    replica loads exactly those bytes (incumbent 0: the base model); raises CheckpointError for
    a version not in the store, ValueError for a share outside [0, 1] or a candidate equal to
    the incumbent."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"candidate share must be in [0, 1], got {share}")
    if candidate and candidate == incumbent:
        raise ValueError(f"v{incumbent} cannot be its own candidate")
    event = events_pb2.ReleaseEvent(
        incumbent_version=incumbent,
        # v0 is the base model, not in the store: replicas that started on it keep it.
        incumbent_manifest_sha256=store.read_manifest(kind, incumbent)[1] if incumbent else "",
        candidate_version=candidate,
        candidate_share=share if candidate else 0.0,
        reason=reason,
    )
    if candidate:
        event.candidate_manifest_sha256 = store.read_manifest(kind, candidate)[1]
    event.decided_at.GetCurrentTime()
    return event
