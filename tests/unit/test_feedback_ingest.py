"""The ingestion core on a fake broker: what is reported stored is exactly what the broker took."""

import gc

import grpc
import pytest
from prometheus_client import REGISTRY

from rlhf.ids import GenerationIdSigner, feedback_event_id
from rlhf.server import Rejected
from rlhf.v1 import events_pb2
from services.feedback.ingest import RecentAcks, Stored
from tests.unit.feedback_fakes import SIGNER, FakePublisher, make_ingest

OK = grpc.StatusCode.OK


def thumb(key, up=True, gid=None, version=1):
    return events_pb2.Feedback(
        generation_id=gid or SIGNER.issue(version),
        idempotency_key=key,
        thumb=events_pb2.THUMB_UP if up else events_pb2.THUMB_DOWN,
    )


def outcome(item):
    """(code, reason) of one stream item; OK for stored ones."""
    if item.stored is not None:
        return (OK, "")
    return (item.rejected.code, item.rejected.reason)


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_event_id_depends_on_tenant_and_key_only():
    assert feedback_event_id("a", "k") == feedback_event_id("a", "k")
    assert (
        len(
            {feedback_event_id("a", "k"), feedback_event_id("b", "k"), feedback_event_id("a", "k2")}
        )
        == 3
    )
    # no ambiguity from concatenation: ("ab", "c") is not ("a", "bc")
    assert feedback_event_id("ab", "c") != feedback_event_id("a", "bc")


def test_resend_is_answered_from_memory_without_publishing_again():
    publisher = FakePublisher()
    ingest = make_ingest(publisher)
    feedback = thumb("click-1")
    first = ingest.submit("tenant-a", feedback)
    again = ingest.submit("tenant-a", feedback)
    assert not first.duplicate and again.duplicate
    assert (again.event_id, again.partition, again.offset) == (
        first.event_id,
        first.partition,
        first.offset,
    )
    assert publisher.event_ids() == [first.event_id]
    assert publisher.records[0][1].tenant == "tenant-a"
    assert publisher.records[0][0] == feedback.generation_id  # keyed by generation id


def test_remembered_keys_add_nothing_for_the_cycle_collector_to_scan():
    recent = RecentAcks(capacity=5_000)
    gc.collect()
    tracked = len(gc.get_objects())
    recent.remember((f"event-{n}", b"f" * 16, Stored(f"event-{n}", n % 4, n)) for n in range(6_000))
    gc.collect()  # a tuple of bytes and ints is untracked once the collector has seen it
    assert len(gc.get_objects()) - tracked < 500  # held as objects: 10k more
    assert recent.get("event-999") is None  # the oldest went past the capacity
    assert recent.get("event-1007") == (b"f" * 16, Stored("event-1007", 3, 1007))


def test_key_reused_for_different_feedback_is_already_exists():
    ingest = make_ingest()
    ingest.submit("tenant-a", thumb("click-2", up=True))
    with pytest.raises(Rejected) as caught:
        ingest.submit("tenant-a", thumb("click-2", up=False))
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_same_key_in_two_tenants_is_two_events():
    publisher = FakePublisher()
    ingest = make_ingest(publisher)
    feedback = thumb("shared-key")
    a, b = ingest.submit("tenant-a", feedback), ingest.submit("tenant-b", feedback)
    assert a.event_id != b.event_id and not b.duplicate
    assert len(publisher.records) == 2


def test_broker_failure_is_unavailable_and_nothing_is_remembered():
    publisher = FakePublisher()
    ingest = make_ingest(publisher)
    feedback = thumb("click-3")
    publisher.mode = "down"
    with pytest.raises(Rejected) as caught:
        ingest.submit("tenant-a", feedback)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    publisher.mode = "ok"
    retried = ingest.submit("tenant-a", feedback)
    assert not retried.duplicate and publisher.event_ids() == [retried.event_id]


def test_unauthenticated_is_refused():
    ingest = make_ingest()
    for metadata in ([], [("authorization", "Bearer nope-nope-nope-nope")]):
        with pytest.raises(Rejected) as caught:
            ingest.authenticate(metadata)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_stream_reports_every_item_in_order_and_publishes_only_valid_ones():
    publisher = FakePublisher()
    stream = make_ingest(publisher).open_stream("tenant-a")
    forged = GenerationIdSigner(b"z" * 32).issue(1)
    expired = SIGNER.issue(1, now=0)
    for feedback in [
        thumb("s-0"),
        thumb("s-1", gid=forged),
        thumb("s-2", gid=expired),
        events_pb2.Feedback(generation_id=SIGNER.issue(1), idempotency_key="s-3", thumb=9),
        thumb("s-4"),
    ]:
        assert stream.add(feedback)
    items = stream.finish()
    assert [i.index for i in items] == [0, 1, 2, 3, 4]
    assert [i.idempotency_key for i in items] == [f"s-{n}" for n in range(5)]
    assert [outcome(i)[0] for i in items] == [
        OK,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        OK,
    ]
    assert publisher.event_ids() == [items[0].stored.event_id, items[4].stored.event_id]
    assert [(i.stored.partition, i.stored.offset) for i in (items[0], items[4])] == [(0, 0), (0, 1)]


def test_stream_item_is_stored_only_if_its_own_publish_succeeded():
    """After the first failure the rest of the stream is refused at once, not retried one by one:
    the client resends them (same keys) on a new stream."""
    publisher = FakePublisher()
    stream = make_ingest(publisher).open_stream("tenant-a")
    stream.add(thumb("f-0"))
    publisher.mode = "fail"
    stream.add(thumb("f-1"))
    stream.add(thumb("f-2"))  # settled with f-1? no: refused once f-1's failure is seen
    publisher.mode = "ok"
    items = stream.finish()
    stored = [i.idempotency_key for i in items if i.stored is not None]
    assert stored == ["f-0"]
    assert {outcome(i) for i in items[1:]} == {(grpc.StatusCode.UNAVAILABLE, "broker_unavailable")}
    assert publisher.event_ids() == [items[0].event_id]


def test_stream_stops_publishing_once_the_broker_is_down():
    publisher = FakePublisher()
    stream = make_ingest(publisher).open_stream("tenant-a")
    publisher.mode = "down"
    stream.add(thumb("d-0"))
    publisher.mode = "ok"  # even if it came back, this stream does not try again
    stream.add(thumb("d-1"))
    items = stream.finish()
    assert [outcome(i)[0] for i in items] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert publisher.records == []


def test_publish_that_never_resolves_is_unavailable_within_the_timeout():
    publisher = FakePublisher()
    publisher.mode = "hang"
    stream = make_ingest(publisher, timeout=0.05).open_stream("tenant-a")
    stream.add(thumb("h-0"))
    [item] = stream.finish()
    assert outcome(item)[0] == grpc.StatusCode.UNAVAILABLE


def test_duplicates_in_one_stream_are_published_once():
    publisher = FakePublisher()
    stream = make_ingest(publisher).open_stream("tenant-a")
    feedback = thumb("dup")
    stream.add(feedback)
    stream.add(feedback)
    stream.add(thumb("dup", up=False))  # same key, other content
    first, copy, conflict = stream.finish()
    assert copy.stored.duplicate and copy.stored.offset == first.stored.offset
    assert outcome(conflict)[0] == grpc.StatusCode.ALREADY_EXISTS
    assert len(publisher.records) == 1


def test_copy_of_an_item_that_failed_fails_too():
    publisher = FakePublisher()
    stream = make_ingest(publisher).open_stream("tenant-a")
    publisher.mode = "hang"
    feedback = thumb("twice")
    stream.add(feedback)
    stream.add(feedback)
    items = stream.finish()
    assert [outcome(i)[0] for i in items] == [grpc.StatusCode.UNAVAILABLE] * 2


def test_stream_over_its_limit_stops_reading():
    publisher = FakePublisher()
    stream = make_ingest(publisher, max_items=3).open_stream("tenant-a")
    accepted = [stream.add(thumb(f"l-{n}")) for n in range(4)]
    assert accepted == [True, True, True, False]
    items = stream.finish()
    assert [outcome(i)[0] for i in items] == [OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(publisher.records) == 3


def test_window_bounds_events_in_flight():
    publisher = FakePublisher()
    stream = make_ingest(publisher, window=2).open_stream("tenant-a")
    for n in range(6):
        stream.add(thumb(f"w-{n}"))
        unresolved = sum(not f.waited for f in publisher.futures)
        assert unresolved <= 2
    assert all(outcome(i)[0] == OK for i in stream.finish())


def test_metrics_by_tenant_and_policy_version():
    ingest = make_ingest()
    ingest.submit("tenant-b", thumb("m-0", up=True, version=77))
    stream = ingest.open_stream("tenant-b")
    stream.add(thumb("m-1", up=False, version=77))
    feedback = thumb("m-2", up=True, version=77)
    stream.add(feedback)
    stream.add(feedback)  # a copy: counted as a duplicate only
    stream.add(thumb("m-3", gid="not-an-id"))
    stream.finish()
    labels = {"tenant": "tenant-b", "policy_version": "77"}
    assert sample("rlhf_feedback_accepted_total", signal="thumb", **labels) == 3
    assert sample("rlhf_feedback_thumbs_total", thumb="up", **labels) == 2
    assert sample("rlhf_feedback_thumbs_total", thumb="down", **labels) == 1
    assert sample("rlhf_feedback_duplicates_total", tenant="tenant-b") == 1
    assert sample("rlhf_feedback_rejected_total", tenant="tenant-b", reason="malformed_id") == 1
    assert sample("rlhf_feedback_publish_seconds_count", mode="pipelined") >= 1  # item 0
