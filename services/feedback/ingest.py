"""Feedback ingestion shared by gRPC and HTTP: authenticate, validate, deduplicate, publish.

Delivery: an item is reported stored only once the broker acknowledged it (acks=all); anything
else is reported as not stored, with the reason.

Duplicates are deduplicated downstream, by construction: the event id is a digest of (tenant,
idempotency key), or of (tenant, generation, user key, kind of signal) when the app names its
user, so every copy of a submission, and every further thumb of one user on one answer, carries
the same event id wherever and whenever it was published (retries, replicas, restarts), and
consumers keep the first copy (`rlhf.joining.FeedbackJoin`). On top of that each process
remembers recently stored keys and answers a resend from memory without publishing it again
(best effort: bounded, per process).

Each tenant's submissions are rate limited per process (a token bucket: RESOURCE_EXHAUSTED
beyond it), so one tenant cannot crowd out the others.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter as Tally
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from rlhf import bus
from rlhf.auth import Credentials, Unauthenticated
from rlhf.bus import BusUnavailable, Publisher
from rlhf.ids import GenerationIdSigner, feedback_event_id, user_signal_event_id
from rlhf.limits import RateLimiter
from rlhf.server import Rejected
from rlhf.v1 import events_pb2

from .validation import MAX_IDEMPOTENCY_KEY, Limits, validate_feedback

ACCEPTED = Counter(
    "rlhf_feedback_accepted_total",
    "feedback events the broker acknowledged (resends answered from memory excluded)",
    ["tenant", "policy_version", "signal"],
)
THUMBS = Counter(
    "rlhf_feedback_thumbs_total",
    "stored thumbs by direction: the thumbs-up rate per policy version is the drift signal",
    ["tenant", "policy_version", "thumb"],
)
REJECTED = Counter(
    "rlhf_feedback_rejected_total",
    "submissions not stored, by cause (tenant is empty when unauthenticated)",
    ["tenant", "reason"],
)
DUPLICATES = Counter(
    "rlhf_feedback_duplicates_total",
    "resends of an already stored idempotency key, answered without publishing",
    ["tenant"],
)
PUBLISH_SECONDS = Histogram(
    "rlhf_feedback_publish_seconds",
    "time from handing an event to the producer until the broker acknowledged it",
    ["mode"],  # "sync": SubmitFeedback and HTTP; "pipelined": StreamFeedback
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
_PIPELINED_SECONDS = PUBLISH_SECONDS.labels("pipelined")
# A stream's acknowledgement latency is sampled on every ACK_SAMPLE-th item: a callback per item
# on the producer's I/O thread costs more than the histogram is worth.
ACK_SAMPLE = 16
THUMB_NAMES = {events_pb2.THUMB_UP: "up", events_pb2.THUMB_DOWN: "down"}


@dataclass(frozen=True)
class Stored:
    """Where the broker stored an event (for a duplicate: where the original is)."""

    event_id: str
    partition: int
    offset: int
    duplicate: bool = False


def fingerprint_of(feedback: events_pb2.Feedback) -> bytes:
    """What the client sent, to tell a genuine resend from a key reused for different feedback."""
    return hashlib.blake2b(feedback.SerializeToString(deterministic=True), digest_size=16).digest()


class RecentAcks:
    """The most recently stored submissions by event id (LRU, bounded), to answer resends.

    Each entry is kept as a plain tuple of bytes and ints, which the garbage collector stops
    tracking: a full memory held as `Stored` objects put 200k+ more objects into every full
    collection, 100 ms pauses once a second at 12k events/s (p99 of SubmitFeedback 14 -> 134 ms).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[bytes, int, int]] = OrderedDict()

    def get(self, event_id: str) -> tuple[bytes, Stored] | None:
        """(the fingerprint, where stored) of a remembered event id."""
        with self._lock:
            entry = self._entries.get(event_id)
        if entry is None:
            return None
        fingerprint, partition, offset = entry
        return fingerprint, Stored(event_id, partition, offset)

    def remember(self, entries: Iterable[tuple[str, bytes, Stored]]) -> None:
        """Remember (event id, fingerprint, where stored) of each entry, under one lock."""
        with self._lock:
            for event_id, fingerprint, stored in entries:
                self._entries[event_id] = (fingerprint, stored.partition, stored.offset)
                self._entries.move_to_end(event_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


@dataclass(slots=True, eq=False)
class Item:
    """One submission on its way to the broker, and finally its outcome."""

    index: int
    idempotency_key: str
    event_id: str = ""
    key: str = ""  # the Kafka key: rlhf.ids.partition_key of the generation id
    fingerprint: bytes = b""
    policy_version: int = 0
    signal: str = ""
    thumb: str = ""
    event: events_pb2.FeedbackEvent | None = None  # set while it still has to be published
    future: Any = None
    sent_at: float = 0.0
    acked_at: float = 0.0
    stored: Stored | None = None
    rejected: Rejected | None = None
    same_as: Item | None = None  # an earlier item of the same stream with the same key

    def mark_acked(self, _metadata: Any) -> None:
        """Producer callback (runs on the producer's I/O thread): note when the broker answered."""
        self.acked_at = time.perf_counter()


def _now() -> Timestamp:
    """The current time (from time_ns: a quarter of the cost of Timestamp.GetCurrentTime)."""
    nanoseconds = time.time_ns()
    return Timestamp(seconds=nanoseconds // 1_000_000_000, nanos=nanoseconds % 1_000_000_000)


def _unavailable(detail: str) -> Rejected:
    return Rejected(
        grpc.StatusCode.UNAVAILABLE,
        "broker_unavailable",
        f"not confirmed by the broker, resend with the same idempotency key: {detail}",
    )


def _conflict(item: Item) -> Rejected:
    if item.event_id.startswith("u"):  # named after (generation, user, kind of signal)
        return Rejected(
            grpc.StatusCode.ALREADY_EXISTS,
            "already_rated",
            "this user already gave this kind of feedback on this generation",
        )
    return Rejected(
        grpc.StatusCode.ALREADY_EXISTS,
        "idempotency_conflict",
        "this idempotency_key was already used for different feedback",
    )


def _rate_limited(tenant: str) -> Rejected:
    return Rejected(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate_limited",
        f"tenant {tenant!r} is over its feedback rate limit; resend later with the same key",
    )


def echoed_key(key: str) -> str:
    """What a stream's result repeats of an item's idempotency key: a valid key whole, a
    runaway one cut (results must stay small whatever was sent)."""
    return key[:MAX_IDEMPOTENCY_KEY]


def event_id_of(tenant: str, feedback: events_pb2.Feedback) -> str:
    """The stored event's id (see the module docstring)."""
    if feedback.user_key:
        signal = feedback.WhichOneof("signal") or ""
        return user_signal_event_id(tenant, feedback.generation_id, feedback.user_key, signal)
    return feedback_event_id(tenant, feedback.idempotency_key)


@dataclass(frozen=True)
class StreamLimits:
    max_items: int  # items one StreamFeedback call may carry
    window: int  # events in flight to the broker per stream before the handler waits


class FeedbackIngest:
    """The transport-independent core. Thread-safe: one instance serves every request."""

    def __init__(
        self,
        api_keys: Credentials,
        signer: GenerationIdSigner,
        limits: Limits,
        publisher: Publisher,
        publish_timeout: float,
        recent: RecentAcks,
        stream_limits: StreamLimits,
        rate: RateLimiter | None = None,
    ) -> None:
        """`rate`: the per-tenant rate limit (None: unlimited)."""
        self._api_keys = api_keys
        self._rate = rate
        self._signer = signer
        self._limits = limits
        self.publisher = publisher
        self.publish_timeout = publish_timeout
        self._recent = recent
        self.stream_limits = stream_limits

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The caller's tenant; raises Rejected(UNAUTHENTICATED)."""
        try:
            return self._api_keys.tenant_for(metadata)
        except Unauthenticated as exc:
            raise self.count_rejection(
                "", Rejected(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", str(exc))
            ) from exc

    @staticmethod
    def count_rejection(tenant: str, rejected: Rejected) -> Rejected:
        REJECTED.labels(tenant, rejected.reason).inc()
        return rejected

    def submit(self, tenant: str, feedback: events_pb2.Feedback) -> Stored:
        """Store one submission and return where; raises Rejected (UNAVAILABLE: not stored)."""
        try:
            item = self.admit(tenant, feedback, index=0)
            if item.stored is None:
                item.stored = self._publish_now(item)
        except Rejected as exc:
            self.count_rejection(tenant, exc)
            raise
        self.record(tenant, [item])
        return item.stored

    def admit(self, tenant: str, feedback: events_pb2.Feedback, index: int) -> Item:
        """Validate and identify a submission: an Item to publish, or one already stored."""
        if self._rate is not None and not self._rate.take(tenant):
            raise _rate_limited(tenant)
        claims = validate_feedback(feedback, self._signer, self._limits, tenant)
        item = Item(
            index=index,
            idempotency_key=feedback.idempotency_key,
            event_id=event_id_of(tenant, feedback),
            # What partition_key would parse out of the id again, from its verified claims.
            key=claims.prompt_hash or feedback.generation_id,
            fingerprint=fingerprint_of(feedback),
            policy_version=claims.policy_version,
            signal=feedback.WhichOneof("signal") or "",
            thumb=THUMB_NAMES.get(feedback.thumb, "") if feedback.HasField("thumb") else "",
        )
        earlier = self._recent.get(item.event_id)
        if earlier is not None:
            earlier_fingerprint, stored = earlier
            if earlier_fingerprint != item.fingerprint:
                raise _conflict(item)
            item.stored = replace(stored, duplicate=True)
            return item
        item.event = events_pb2.FeedbackEvent(
            event_id=item.event_id,
            tenant=tenant,
            feedback=feedback,
            policy_version=claims.policy_version,
            received_at=_now(),
        )
        return item

    def _publish_now(self, item: Item) -> Stored:
        assert item.event is not None
        started = time.perf_counter()
        try:
            partition, offset = self.publisher.publish(
                bus.FEEDBACK,
                item.key,
                item.event,
                timeout=self.publish_timeout,
            )
        except BusUnavailable as exc:
            raise _unavailable(str(exc)) from exc
        PUBLISH_SECONDS.labels("sync").observe(time.perf_counter() - started)
        return Stored(item.event_id, partition, offset)

    def record(self, tenant: str, items: list[Item]) -> None:
        """Remember newly stored items, to answer resends, and count every outcome."""
        self._recent.remember(
            (item.event_id, item.fingerprint, item.stored)
            for item in items
            if item.stored is not None and not item.stored.duplicate
        )
        _count_outcomes(tenant, items)

    def open_stream(self, tenant: str) -> StreamIngest:
        return StreamIngest(self, tenant)


def _count_outcomes(tenant: str, items: list[Item]) -> None:
    """Metrics for a batch of items, one increment per label set (a stream has thousands)."""
    accepted: Tally[tuple[str, str]] = Tally()
    thumbs: Tally[tuple[str, str]] = Tally()
    rejected: Tally[str] = Tally()
    duplicates = 0
    for item in items:
        if item.stored is None:
            if item.rejected is not None:
                rejected[item.rejected.reason] += 1
        elif item.stored.duplicate:
            duplicates += 1
        else:
            accepted[(str(item.policy_version), item.signal)] += 1
            if item.thumb:
                thumbs[(str(item.policy_version), item.thumb)] += 1
    for (version, signal), count in accepted.items():
        ACCEPTED.labels(tenant, version, signal).inc(count)
    for (version, thumb), count in thumbs.items():
        THUMBS.labels(tenant, version, thumb).inc(count)
    for reason, count in rejected.items():
        REJECTED.labels(tenant, reason).inc(count)
    if duplicates:
        DUPLICATES.labels(tenant).inc(duplicates)


class StreamIngest:
    """One StreamFeedback call: each item is validated and published as it arrives (pipelined),
    and reported stored only once its own publish future resolved successfully."""

    def __init__(self, ingest: FeedbackIngest, tenant: str) -> None:
        self._ingest = ingest
        self._tenant = tenant
        self._limits = ingest.stream_limits
        self.items: list[Item] = []
        self._in_flight: deque[Item] = deque()
        self._first_by_event: dict[str, Item] = {}
        # Once the broker failed, later items of this stream are refused at once instead of each
        # waiting out the producer's timeout; the client resends them on a new stream.
        self._bus_error = ""

    def add(self, feedback: events_pb2.Feedback) -> bool:
        """Take the next item; False once the stream is over its limit and reading must stop."""
        index = len(self.items)
        if index >= self._limits.max_items:
            limit = self._limits.max_items
            self._fail(
                Item(index, echoed_key(feedback.idempotency_key)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "stream_too_long",
                f"a stream carries at most {limit} items; this and later items were not read",
            )
            return False
        try:
            item = self._ingest.admit(self._tenant, feedback, index)
        except Rejected as exc:
            self.items.append(Item(index, echoed_key(feedback.idempotency_key), rejected=exc))
            return True
        self.items.append(item)
        if item.stored is None:
            self._dispatch(item)
        return True

    def add_undecodable(self, detail: str) -> None:
        """A message that is not a StreamFeedbackRequest: its items cannot be numbered."""
        self._fail(
            Item(len(self.items), ""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "undecodable",
            f"message is not a StreamFeedbackRequest ({detail}); later items were not read",
        )

    def _fail(self, item: Item, code: grpc.StatusCode, reason: str, message: str) -> None:
        item.rejected = Rejected(code, reason, message)
        self.items.append(item)

    def _dispatch(self, item: Item) -> None:
        """Publish a new item, or tie it to an earlier item of this stream with the same key."""
        first = self._first_by_event.get(item.event_id)
        if first is not None:
            item.event = None
            if first.fingerprint != item.fingerprint:
                item.rejected = _conflict(item)
            else:
                item.same_as = first
            return
        self._first_by_event[item.event_id] = item
        self._send(item)

    def _send(self, item: Item) -> None:
        assert item.event is not None
        if self._bus_error:
            item.rejected, item.event = _unavailable(self._bus_error), None
            return
        publisher = self._ingest.publisher
        try:
            item.future = publisher.publish_async(bus.FEEDBACK, item.key, item.event)
        except BusUnavailable as exc:
            self._bus_error = str(exc)
            item.rejected, item.event = _unavailable(self._bus_error), None
            return
        if not item.index % ACK_SAMPLE:  # the producer's I/O thread runs the callback
            item.sent_at = time.perf_counter()
            item.future.add_callback(item.mark_acked)
        self._in_flight.append(item)
        while len(self._in_flight) > self._limits.window:
            self._settle(self._in_flight.popleft(), self._ingest.publish_timeout)

    def _settle(self, item: Item, timeout: float) -> None:
        """Wait (bounded) for one item's publish future and record its outcome."""
        try:
            metadata = item.future.get(timeout=max(0.0, timeout))
        except Exception as exc:  # any failure or timeout means: not confirmed, so not stored
            self._bus_error = self._bus_error or repr(exc)
            item.rejected = _unavailable(repr(exc))
        else:
            item.stored = Stored(item.event_id, metadata.partition, metadata.offset)
            if item.sent_at:
                _PIPELINED_SECONDS.observe((item.acked_at or time.perf_counter()) - item.sent_at)
        item.future, item.event = None, None

    def finish(self) -> list[Item]:
        """Wait for every publish still in flight (bounded), then resolve and count all items."""
        deadline = time.monotonic() + self._ingest.publish_timeout
        while self._in_flight:
            self._settle(self._in_flight.popleft(), deadline - time.monotonic())
        for item in self.items:
            if item.same_as is not None:
                first = item.same_as
                if first.stored is not None:
                    item.stored = replace(first.stored, duplicate=True)
                else:
                    item.rejected = first.rejected
        self._ingest.record(self._tenant, self.items)
        return self.items
