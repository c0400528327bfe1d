"""An in-memory stand-in for rlhf.bus.Publisher, and a FeedbackIngest built on it."""

from __future__ import annotations

import threading
from collections import namedtuple

from kafka.errors import KafkaTimeoutError, NotLeaderForPartitionError

from rlhf.auth import APP, Credentials
from rlhf.bus import BusUnavailable
from rlhf.ids import GenerationIdSigner
from services.feedback.ingest import FeedbackIngest, RecentAcks, StreamLimits
from services.feedback.validation import Limits

ID_KEY = b"k" * 32
SIGNER = GenerationIdSigner(ID_KEY)
API_KEY = "unit-api-key-0123456789"
OTHER_KEY = "other-api-key-0123456789"
AUTH = [("authorization", f"Bearer {API_KEY}")]
Metadata = namedtuple("Metadata", "partition offset")


class FakeFuture:
    """Resolved at creation (stored or failed), or pending forever ("hang")."""

    def __init__(self, metadata=None, error=None):
        self.metadata, self.error, self.waited = metadata, error, False

    def get(self, timeout=None):
        self.waited = True
        if self.error is not None:
            raise self.error
        if self.metadata is None:
            raise KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")
        return self.metadata

    def add_callback(self, fn):
        if self.metadata is not None:
            fn(self.metadata)


class FakePublisher:
    """A broker in a list. `mode` decides the next publishes: "ok", "fail", "down" or "hang"."""

    def __init__(self):
        self.records = []  # (key, FeedbackEvent) in the order the "broker" stored them
        self.mode = "ok"
        self.futures = []
        self._lock = threading.Lock()

    def _store(self, key, message):
        with self._lock:
            self.records.append((key, message))
            return Metadata(0, len(self.records) - 1)

    def publish(self, topic, key, message, timeout=5.0, headers=None):
        if self.mode != "ok":
            raise BusUnavailable(f"fake broker is {self.mode}")
        return tuple(self._store(key, message))

    def publish_async(self, topic, key, message, headers=None):
        if self.mode == "down":
            raise BusUnavailable("fake broker is down")
        if self.mode == "fail":
            future = FakeFuture(error=NotLeaderForPartitionError("fake failure"))
        elif self.mode == "hang":
            future = FakeFuture()
        else:
            future = FakeFuture(metadata=self._store(key, message))
        self.futures.append(future)
        return future

    def close(self, timeout=None):
        pass

    def event_ids(self):
        return [event.event_id for _, event in self.records]


def make_ingest(publisher=None, max_items=100, window=1000, recent=1000, timeout=0.2):
    keys = Credentials([(APP, "tenant-a", API_KEY), (APP, "tenant-b", OTHER_KEY)])
    return FeedbackIngest(
        keys,
        SIGNER,
        Limits(max_text_chars=100, max_ranking_size=4),
        publisher if publisher is not None else FakePublisher(),
        timeout,
        RecentAcks(recent),
        StreamLimits(max_items, window),
    )
