"""Hot reload for serving pods: follow a checkpoint topic, verify, swap atomically.

Requests take a snapshot of the served model when they start (`HotSwap.current()`), so a swap never
changes the model under an in-flight request. A new checkpoint is loaded beside the old one and
verified against the hash announced in its event; a checkpoint that fails is refused with a log
line and a metric, and the old version keeps serving.

A follower that fails unexpectedly (not a refused checkpoint: a bug, memory, a broken device)
reports itself unhealthy, so its service answers health checks NOT_SERVING, and tries the event
again a few times before it gives up on it and is healthy again, still serving what it served.
At start-up a pod serves the newest checkpoint that verifies, falling back to older ones.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
from google.protobuf.message import Message
from prometheus_client import Counter, Gauge, Histogram

from rlhf.bus import EventConsumer, Record
from rlhf.checkpoints import CheckpointError, CheckpointStore, VerifiedCheckpoint
from rlhf.models import on_own_thread
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

M = TypeVar("M")

RELOADS = Counter(
    "rlhf_checkpoint_reloads_total", "checkpoint loads by outcome", ["kind", "outcome"]
)
RELOAD_SECONDS = Histogram(
    "rlhf_checkpoint_reload_seconds",
    "time from reading a checkpoint event to serving it",
    ["kind"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60),
)
SERVED_VERSION = Gauge("rlhf_served_version", "checkpoint version being served", ["kind"])
FOLLOWER_FAILURES = Counter(
    "rlhf_checkpoint_follower_failures_total",
    "unexpected failures handling a checkpoint event (each makes the service NOT_SERVING until "
    "the event is handled or given up)",
    ["topic"],
)
ATTEMPTS = 3  # tries at one checkpoint event that fails unexpectedly
# How long the broker may hold a checkpoint follower's empty fetch: an event arriving meanwhile
# can wait for it (part of every hot reload), and an idle follower asks about this often.
FOLLOW_FETCH_WAIT_MS = 50
RETRY_SECONDS = 2.0  # wait before the next try, times the attempt number


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def return_freed_memory() -> bool:
    """Hand memory the process freed back to the system (glibc's `malloc_trim`); False where the
    C library has no such call.

    glibc keeps freed memory in its arenas for reuse, and a retired model leaves holes among
    live allocations that `free` alone never returns; each load runs on a thread of its own,
    with an arena of its own. So every hot swap raised a reward service's resident memory by
    most of a model: in-process, 18 swaps among three MiniLM checkpoints took it from 427 to
    718 MB; trimmed after each swap it stayed at 444-468 MB, at 5-10 ms a trim, which runs
    without the interpreter lock."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


@dataclass(frozen=True)
class Served(Generic[M]):
    model: M
    version: int
    manifest_sha256: str
    loaded_at: float


class HotSwap(Generic[M]):
    """Holds the served model; readers snapshot it, the follower swaps it."""

    def __init__(self, kind: str, initial: Served[M]) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._served = initial
        SERVED_VERSION.labels(kind).set(initial.version)

    def current(self) -> Served[M]:
        return self._served

    def swap(self, new: Served[M]) -> None:
        with self._lock:
            self._served = new
        SERVED_VERSION.labels(self.kind).set(new.version)

    def served_for(self, key: str | None, exact: bool) -> Served[M]:
        """Which version answers a request: the one served (see `Routes`)."""
        return self._served


class Routes(Protocol):
    """What a batcher asks of the served models: which version answers a request as it is
    admitted. One version (`HotSwap`), or an incumbent and a candidate (`rlhf.canary`)."""

    kind: str

    def current(self) -> Served[Any]:
        """The version that answers by default (and that status reports)."""
        ...

    def served_for(self, key: str | None, exact: bool) -> Served[Any]:
        """The version for a request with routing key `key` (None: none given); `exact`
        marks a trainer's rollout."""
        ...


def load_served(
    store: CheckpointStore,
    kind: str,
    version: int,
    build: Callable[[VerifiedCheckpoint], M],
    expected_manifest_sha256: str | None = None,
    reuse: Callable[[], dict[str, torch.Tensor] | None] | None = None,
) -> Served[M]:
    """Load and verify one checkpoint version and build the servable model from it; `reuse`
    may offer memory to read the files into (see `CheckpointStore.load`)."""
    started = time.perf_counter()
    spare = reuse() if reuse is not None else None
    checkpoint = store.load(kind, version, expected_manifest_sha256, spare)
    loaded = time.perf_counter()
    model = build(checkpoint)
    log.info(
        "%s v%d read and verified in %.3f s, built in %.3f s",
        kind,
        version,
        loaded - started,
        time.perf_counter() - loaded,
    )
    return Served(model, version, checkpoint.manifest_sha256, time.time())


class CheckpointEvents:
    """A background thread handing every event on `topic` to `handle`, in order: checkpoint
    events (`message_type`), or release events (`rlhf.canary`)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        client_id: str,
        handle: Callable[[Any], object],
        message_type: type[Message] = events_pb2.CheckpointEvent,
    ) -> None:
        self._handle = handle
        self._message_type = message_type
        self._bootstrap, self._topic, self._client_id = bootstrap, topic, client_id
        self._consumer: EventConsumer | None = None
        self._stopping = threading.Event()
        self._failing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow-{topic}", daemon=True)

    def start(self) -> None:
        # No consumer group: every replica must see every checkpoint event. Replaying the topic
        # from the beginning is cheap (a few small events) and closes the gap between loading the
        # latest version at start-up and subscribing.
        self._consumer = EventConsumer(
            self._bootstrap,
            {self._topic: self._message_type},
            group_id=None,
            client_id=self._client_id,
            from_beginning=True,
            fetch_max_wait_ms=FOLLOW_FETCH_WAIT_MS,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._consumer is not None:
            self._consumer.close()

    def healthy(self) -> bool:
        """False while an event keeps failing, or if the thread died."""
        dead = self._consumer is not None and not self._thread.is_alive()
        return not self._failing.is_set() and not (dead and not self._stopping.is_set())

    def _run(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            try:
                records = self._consumer.poll(timeout=0.5)
            except Exception:  # the broker may come and go; keep serving the current model
                log.exception("polling checkpoint events failed; retrying")
                self._stopping.wait(1.0)
                continue
            for record in records:
                if self._stopping.is_set():
                    return
                self._deliver(record)

    def _deliver(self, record: Record) -> None:
        """Hand one event over; on an unexpected failure be unhealthy, try again a few times,
        then give up on it (logged) and be healthy again: the served model stays."""
        where = f"{record.topic}@{record.offset}"
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self._handle(record.message)
            except Exception:
                FOLLOWER_FAILURES.labels(self._topic).inc()
                self._failing.set()
                log.exception("handling %s failed (attempt %d of %d)", where, attempt, ATTEMPTS)
                if self._stopping.wait(RETRY_SECONDS * attempt):
                    return
                continue
            self._failing.clear()
            return
        log.error("giving up on %s after %d attempts; serving what was served", where, ATTEMPTS)
        self._failing.clear()


class Following:
    """A follower's life cycle and health: those of its event thread (`_events`)."""

    _events: CheckpointEvents

    def start(self) -> None:
        self._events.start()

    def stop(self) -> None:
        self._events.stop()

    def healthy(self) -> bool:
        return self._events.healthy()


class CheckpointFollower(Following, Generic[M]):
    """Loads each newer checkpoint announced on `topic` and swaps it into `slot`.

    The one verify-or-refuse path: `build` turns a verified checkpoint into what is served (a
    model in memory; nothing, for servers that load weights themselves), and `activate`, if
    given, runs on it before the swap (e.g. rolling TGI pods onto the verified version).
    `reuse`, if given, offers memory nothing uses any more to read the next checkpoint into."""

    def __init__(
        self,
        slot: HotSwap[M],
        store: CheckpointStore,
        build: Callable[[VerifiedCheckpoint], M],
        bootstrap: str,
        topic: str,
        client_id: str,
        activate: Callable[[Served[M]], None] | None = None,
        reuse: Callable[[], dict[str, torch.Tensor] | None] | None = None,
    ) -> None:
        self._slot = slot
        self._store = store
        self._build = build
        self._activate = activate
        self._reuse = reuse
        self._events = CheckpointEvents(bootstrap, topic, client_id, self.apply)

    def apply(self, event: events_pb2.CheckpointEvent) -> bool:
        """Load the announced version if it is newer (on a thread of its own, `on_own_thread`);
        returns True when it is now served."""
        kind = self._slot.kind
        if event.version <= self._slot.current().version:
            return False
        started = time.perf_counter()
        try:
            served = on_own_thread(
                lambda: load_served(
                    self._store,
                    kind,
                    event.version,
                    self._build,
                    event.manifest_sha256,
                    self._reuse,
                )
            )
            if self._activate is not None:
                self._activate(served)
        except (CheckpointError, ValueError, KeyError, OSError) as exc:
            RELOADS.labels(kind, "refused").inc()
            log.error("refusing %s checkpoint v%d: %s", kind, event.version, exc)
            return_freed_memory()  # what the refused load read
            return False
        self._slot.swap(served)
        elapsed = time.perf_counter() - started
        RELOADS.labels(kind, "loaded").inc()
        RELOAD_SECONDS.labels(kind).observe(elapsed)
        log.info("now serving %s v%d (loaded in %.2f s)", kind, event.version, elapsed)
        # The version swapped out (or, while a request still holds it, the one before it).
        return_freed_memory()
        return True


def latest_or_base(
    store: CheckpointStore,
    kind: str,
    build: Callable[[VerifiedCheckpoint], M],
    base: Callable[[], M],
) -> Served[M]:
    """The newest checkpoint of `kind` that verifies and builds, an older one if it does not
    (a bad newest checkpoint must not be a crash loop), or version 0 built by `base` if none
    does; loaded on a thread of its own (`on_own_thread`), so the decode loop has the cores'
    OpenMP workers to itself."""
    for version in reversed(store.versions(kind)):
        try:
            return on_own_thread(lambda version=version: load_served(store, kind, version, build))
        except (CheckpointError, ValueError, KeyError, OSError) as exc:
            RELOADS.labels(kind, "refused").inc()
            log.error(
                "%s v%d is unusable at start-up (%s); trying an older one", kind, version, exc
            )
    return Served(on_own_thread(base), 0, "", time.time())
