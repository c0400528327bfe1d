"""The feedback service on a real broker: authenticated, validated, acknowledged only once the
broker has it, every item counted once."""

import json
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from rlhf import bus
from rlhf.broker import EmbeddedBroker, free_port
from rlhf.ids import GenerationIdSigner, feedback_event_id
from rlhf.server import server_for
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc
from services.feedback.config import FeedbackConfig
from services.feedback.ingest import ACK_SAMPLE
from services.feedback.main import FeedbackService
from tests.conftest import API_KEY, AUTH, ID_KEY, TENANT, consume_all, scrape, serve

SIGNER = GenerationIdSigner(ID_KEY.encode())
OK, UNAVAILABLE = 0, grpc.StatusCode.UNAVAILABLE.value[0]
STREAM_LIMIT = 500


def _config(bootstrap, **overrides):
    settings = {
        "kafka_bootstrap": bootstrap,
        "grpc_host": "127.0.0.1",
        "generation_id_key": ID_KEY,
        "api_keys": (f"{TENANT}={API_KEY}",),
        "publish_timeout_seconds": 3.0,
        "max_stream_items": STREAM_LIMIT,
        "http_port": 0,
        **overrides,
    }
    return FeedbackConfig(**settings)


@pytest.fixture(scope="module")
def server(broker):
    running = serve(FeedbackService(_config(broker.bootstrap)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield feedback_pb2_grpc.FeedbackServiceStub(channel)


def _key(label="k"):
    return f"{label}-{uuid.uuid4().hex}"


def _feedback(gid=None, thumb=events_pb2.THUMB_UP, key=None, version=4):
    return events_pb2.Feedback(
        generation_id=gid or SIGNER.issue(policy_version=version),
        idempotency_key=key or _key(),
        thumb=thumb,
    )


def _thumb(gid=None, thumb=events_pb2.THUMB_UP):
    return feedback_pb2.SubmitFeedbackRequest(feedback=_feedback(gid, thumb))


def _code(call):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def _stream(stub, items, per_message=50, timeout=30):
    messages = [
        feedback_pb2.StreamFeedbackRequest(items=items[i : i + per_message])
        for i in range(0, len(items), per_message)
    ]
    return stub.StreamFeedback(iter(messages), metadata=AUTH, timeout=timeout)


def _metric(text, name, **labels):
    """The value of one sample in a /metrics page (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def _records_of(bootstrap, event_ids):
    """Our records on the feedback topic (the session broker is shared with other tests)."""
    wanted = set(event_ids)
    records = consume_all(bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
    return [r for r in records if r.message.event_id in wanted]


def test_accepted_feedback_is_on_the_topic_where_the_reply_says(stub, broker, server):
    request = _thumb()
    reply = stub.SubmitFeedback(request, metadata=AUTH)
    [record] = _records_of(broker.bootstrap, [reply.event_id])
    assert (record.partition, record.offset) == (reply.partition, reply.offset)
    assert record.key == request.feedback.generation_id
    assert record.message.tenant == TENANT and record.message.policy_version == 4
    assert record.message.feedback == request.feedback
    assert reply.event_id == feedback_event_id(TENANT, request.feedback.idempotency_key)
    metrics = scrape(server)
    thumbs = {"tenant": TENANT, "policy_version": "4", "thumb": "up"}
    assert _metric(metrics, "rlhf_feedback_thumbs_total", **thumbs) >= 1
    assert _metric(metrics, "rlhf_feedback_publish_seconds_count", mode="sync") >= 1


def test_missing_or_wrong_key_is_unauthenticated(stub):
    assert _code(lambda: stub.SubmitFeedback(_thumb())) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer not-the-key-at-all"),)
    assert _code(lambda: stub.SubmitFeedback(_thumb(), metadata=wrong)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    items = [_feedback()]
    messages = iter([feedback_pb2.StreamFeedbackRequest(items=items)])
    assert _code(lambda: stub.StreamFeedback(messages, metadata=wrong)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_forged_expired_unknown_and_malformed_input(stub, server):
    forged = GenerationIdSigner(b"f" * 32).issue(1)
    assert _code(lambda: stub.SubmitFeedback(_thumb(forged), metadata=AUTH)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    expired = SIGNER.issue(1, now=1000)
    assert _code(lambda: stub.SubmitFeedback(_thumb(expired), metadata=AUTH)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert _code(lambda: stub.SubmitFeedback(_thumb(thumb=9), metadata=AUTH)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert _code(lambda: stub.SubmitFeedback(_thumb("not-an-id"), metadata=AUTH)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    empty = feedback_pb2.SubmitFeedbackRequest()
    assert _code(lambda: stub.SubmitFeedback(empty, metadata=AUTH)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    metrics = scrape(server)
    for reason in ("forged_id", "expired_id", "bad_thumb", "malformed_id"):
        assert _metric(metrics, "rlhf_feedback_rejected_total", tenant=TENANT, reason=reason) >= 1


def test_oversize_message_is_resource_exhausted(stub):
    request = _thumb()
    request.feedback.comment = "x" * (5 * 1024 * 1024)  # over the 4 MiB message limit
    assert _code(lambda: stub.SubmitFeedback(request, metadata=AUTH)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_resend_is_stored_once_and_answered_with_the_original_position(stub, broker):
    request = _thumb()
    first = stub.SubmitFeedback(request, metadata=AUTH)
    again = stub.SubmitFeedback(request, metadata=AUTH)
    assert again.duplicate and not first.duplicate
    assert (again.event_id, again.partition, again.offset) == (
        first.event_id,
        first.partition,
        first.offset,
    )
    assert len(_records_of(broker.bootstrap, [first.event_id])) == 1
    request.feedback.thumb = events_pb2.THUMB_DOWN  # same key, other feedback
    assert _code(lambda: stub.SubmitFeedback(request, metadata=AUTH)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )


def test_stream_n_items_in_n_distinct_events_out_with_duplicates(stub, broker, server):
    """400 distinct submissions sent as 480 items: copies inside a stream, across streams and as
    unary resends. Every item is acknowledged; the topic holds each of the 400 exactly once, at
    the position its acknowledgement gave."""
    unique = [_feedback(version=7) for _ in range(400)]
    first = _stream(stub, unique[:250] + unique[:40])  # 40 copies within the stream
    second = _stream(stub, unique[250:] + unique[200:240], per_message=1)  # 40 across streams
    for feedback in unique[:10]:
        stub.SubmitFeedback(feedback_pb2.SubmitFeedbackRequest(feedback=feedback), metadata=AUTH)
    results = list(first.results) + list(second.results)
    assert len(results) == 480 and {r.code for r in results} == {OK}
    assert (first.stored, first.failed, second.stored, second.failed) == (290, 0, 190, 0)
    assert sum(r.duplicate for r in results) == 80
    expected = {feedback_event_id(TENANT, f.idempotency_key) for f in unique}
    assert {r.event_id for r in results} == expected
    records = _records_of(broker.bootstrap, expected)
    assert len(records) == 400 and {r.message.event_id for r in records} == expected
    at = {(r.partition, r.offset): r.message.event_id for r in records}
    assert all(at[(r.partition, r.offset)] == r.event_id for r in results)
    metrics = scrape(server)
    labels = {"tenant": TENANT, "policy_version": "7", "signal": "thumb"}
    assert _metric(metrics, "rlhf_feedback_accepted_total", **labels) == 400
    assert _metric(metrics, "rlhf_feedback_duplicates_total", tenant=TENANT) >= 90
    # Acknowledgement latency is sampled on every ACK_SAMPLE-th item of a stream.
    sampled = _metric(metrics, "rlhf_feedback_publish_seconds_count", mode="pipelined")
    assert sampled >= 400 // ACK_SAMPLE
    calls = {"service": "feedback", "method": "StreamFeedback", "code": "OK"}
    assert _metric(metrics, "rlhf_grpc_requests_total", **calls) >= 2


def test_stream_reply_says_which_items_were_stored_and_why_others_were_not(stub, broker):
    forged = GenerationIdSigner(b"f" * 32).issue(1)
    items = [_feedback(), _feedback(gid=forged), _feedback(thumb=0), _feedback()]
    items.append(events_pb2.Feedback(generation_id=SIGNER.issue(1), thumb=1))  # no key
    reply = _stream(stub, items, per_message=2)
    codes = [(r.index, r.code, r.reason) for r in reply.results]
    assert codes == [
        (0, OK, ""),
        (1, grpc.StatusCode.PERMISSION_DENIED.value[0], "forged_id"),
        (2, grpc.StatusCode.INVALID_ARGUMENT.value[0], "bad_thumb"),
        (3, OK, ""),
        (4, grpc.StatusCode.INVALID_ARGUMENT.value[0], "missing_idempotency_key"),
    ]
    stored = [reply.results[0].event_id, reply.results[3].event_id]
    assert len(_records_of(broker.bootstrap, stored)) == 2
    assert [r.idempotency_key for r in reply.results][:4] == [f.idempotency_key for f in items[:4]]


def test_stream_over_its_limit_is_cut_and_says_so(stub, broker):
    items = [_feedback() for _ in range(STREAM_LIMIT + 30)]
    reply = _stream(stub, items, per_message=100)
    assert len(reply.results) == STREAM_LIMIT + 1
    last = reply.results[-1]
    assert (last.index, last.code, last.reason) == (
        STREAM_LIMIT,
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        "stream_too_long",
    )
    assert reply.stored == STREAM_LIMIT
    ids = [feedback_event_id(TENANT, f.idempotency_key) for f in items]
    assert {r.message.event_id for r in _records_of(broker.bootstrap, ids)} == set(
        ids[:STREAM_LIMIT]
    )


def test_broker_down_is_unavailable_quickly_and_nothing_is_acknowledged():
    with EmbeddedBroker() as own:
        bus.ensure_topics(own.bootstrap)
        running = serve(FeedbackService(_config(own.bootstrap)))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
                stub.SubmitFeedback(_thumb(), metadata=AUTH)  # healthy first
                own.stop()
                started = time.monotonic()
                code = _code(lambda: stub.SubmitFeedback(_thumb(), metadata=AUTH, timeout=30))
                assert code == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 10
                started = time.monotonic()
                reply = _stream(stub, [_feedback() for _ in range(200)], per_message=20)
                assert reply.stored == 0 and {r.code for r in reply.results} == {UNAVAILABLE}
                assert time.monotonic() - started < 10
        finally:
            running.stop()


class _Client:
    """Streams every item until each one is acknowledged, resending what was not, like an app.

    Remembers, per acknowledged key, whether the stream that acknowledged it started after
    `restarted` was set.
    """

    def __init__(self, stub, items, restarted, chunk=50, pause=0.02):
        self.stub, self.items, self.restarted = (
            stub,
            {f.idempotency_key: f for f in items},
            restarted,
        )
        self.chunk, self.pause = chunk, pause
        self.acks = {}  # key -> (started after restart?, FeedbackResult)
        self.refused_items = 0
        self.failed_streams = 0
        self.slowest_refusal = 0.0

    def run(self, deadline):
        while len(self.acks) < len(self.items) and time.monotonic() < deadline:
            pending = [k for k in self.items if k not in self.acks][: self.chunk]
            after = self.restarted is not None and self.restarted.is_set()
            started = time.monotonic()
            try:
                reply = _stream(self.stub, [self.items[k] for k in pending], timeout=20)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                self.failed_streams += 1
                time.sleep(0.2)
                continue
            for result in reply.results:
                if result.code == OK:
                    self.acks[result.idempotency_key] = (after, result)
                else:
                    assert result.code == UNAVAILABLE, result
                    self.refused_items += 1
            if reply.failed:
                self.slowest_refusal = max(self.slowest_refusal, time.monotonic() - started)
                time.sleep(0.2)
            time.sleep(self.pause)


def test_broker_restart_mid_stream_loses_nothing_acknowledged_after_it(tmp_path):
    """The broker is stopped while a client streams 1,500 items, then restarted on the same port.

    Clients get UNAVAILABLE for what could not be stored (quickly) and resend it with the same
    keys until acknowledged. Tansu keeps topics in memory, so the restart erases everything the
    first broker stored: those acknowledgements were true when given (a real Kafka keeps them),
    but cannot be checked afterwards. So the assertion is on what the second broker acknowledged:
    every item acknowledged by a stream that began after the restart is on the topic at exactly
    the position its reply gave, and the topic holds nothing but events of these items.
    """
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "tansu.log", create_topics=True)
    broker.start()
    running = serve(FeedbackService(_config(broker.bootstrap, publish_timeout_seconds=2.0)))
    items = [_feedback() for _ in range(1500)]
    restarted = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            client = _Client(feedback_pb2_grpc.FeedbackServiceStub(channel), items, restarted)
            thread = threading.Thread(target=client.run, args=(time.monotonic() + 60,))
            thread.start()
            assert _wait(lambda: len(client.acks) >= 300, 20)
            broker.stop()
            assert _wait(lambda: client.refused_items >= 100 or client.failed_streams >= 2, 30)
            broker.start()
            restarted.set()
            thread.join()
            records = consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
    finally:
        running.stop()
        broker.stop()
    assert len(client.acks) == len(items), "every item is acknowledged in the end"
    after = {r.event_id: r for started_after, r in client.acks.values() if started_after}
    before = [r for started_after, r in client.acks.values() if not started_after]
    assert len(before) >= 300 and len(after) >= 300  # the outage really was mid-stream
    on_topic = {(r.partition, r.offset): r.message.event_id for r in records}
    assert all(on_topic.get((r.partition, r.offset)) == event_id for event_id, r in after.items())
    ours = {feedback_event_id(TENANT, f.idempotency_key) for f in items}
    assert set(on_topic.values()) <= ours
    assert client.slowest_refusal < 10, "UNAVAILABLE must come within a bounded wait"


def test_broker_frozen_mid_stream_every_acknowledged_item_is_stored_once(tmp_path):
    """The broker stops answering (SIGSTOP: a stalled broker, a partition) while a client streams
    1,500 items, then carries on with its data. Publishes in flight time out and are reported
    UNAVAILABLE, though the broker may still store them when it wakes; the client resends them
    with the same keys. So some events are on the topic twice, under one event id: N items in,
    exactly N distinct events out, and every acknowledgement is on the topic where it said."""
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "tansu.log", create_topics=True)
    broker.start()
    running = serve(FeedbackService(_config(broker.bootstrap, publish_timeout_seconds=2.0)))
    items = [_feedback() for _ in range(1500)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            client = _Client(feedback_pb2_grpc.FeedbackServiceStub(channel), items, None)
            thread = threading.Thread(target=client.run, args=(time.monotonic() + 60,))
            thread.start()
            assert _wait(lambda: len(client.acks) >= 300, 20)
            broker.pause()
            assert _wait(lambda: client.refused_items >= 100 or client.failed_streams >= 2, 30)
            broker.resume()
            thread.join()
            records = consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
    finally:
        running.stop()
        broker.stop()
    assert len(client.acks) == len(items)
    expected = {feedback_event_id(TENANT, f.idempotency_key) for f in items}
    assert {r.message.event_id for r in records} == expected
    on_topic = {(r.partition, r.offset): r.message.event_id for r in records}
    assert all(on_topic.get((r.partition, r.offset)) == r.event_id for _, r in client.acks.values())
    assert client.slowest_refusal < 10


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_undecodable_feedback_records_go_to_the_dead_letter_topic(stub, broker):
    """End to end on the feedback topic: a consumer like the trainer's (a group, a dead-letter
    publisher) gets the service's events and parks a garbage record with the reason."""
    good = stub.SubmitFeedback(_thumb(), metadata=AUTH)
    garbage, marker = b"\x0a\xff not a FeedbackEvent", _key("garbage").encode()
    raw = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    raw.send(bus.FEEDBACK, key=marker, value=garbage, partition=good.partition).get(10)
    raw.close()
    later = stub.SubmitFeedback(_thumb(), metadata=AUTH)
    dead_letters = bus.Publisher(broker.bootstrap, client_id="test-dlq")
    seen = set()
    with bus.EventConsumer(
        broker.bootstrap,
        {bus.FEEDBACK: events_pb2.FeedbackEvent},
        group_id=_key("dlq-group"),
        dead_letters=dead_letters,
        max_poll_interval_ms=1000,
    ) as consumer:
        deadline = time.monotonic() + 30
        while {good.event_id, later.event_id} - seen and time.monotonic() < deadline:
            seen |= {r.message.event_id for r in consumer.poll(0.5)}
        consumer.commit()
        assert consumer.dead_lettered >= 1
    dead_letters.close()
    assert {good.event_id, later.event_id} <= seen
    letters = consume_all(broker.bootstrap, bus.DEAD_LETTER, events_pb2.DeadLetter)
    [letter] = [r.message for r in letters if r.message.key == marker]
    assert (letter.source_topic, letter.partition, letter.value) == (
        bus.FEEDBACK,
        good.partition,
        garbage,
    )
    assert "DecodeError" in letter.reason and letter.consumer_group.startswith("dlq-group")


def _post(port, body, key=API_KEY, scheme="http", context=None, content_type="application/json"):
    """(status, JSON reply) of POST /v1/feedback."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{scheme}://localhost:{port}/v1/feedback",
        data=data,
        method="POST",
        headers={
            "Content-Type": content_type,
            **({"Authorization": f"Bearer {key}"} if key else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_http_endpoint_same_auth_validation_and_delivery(server, broker):
    port = server.service.http.port
    key, gid = _key("http"), SIGNER.issue(9)
    body = {"generationId": gid, "idempotencyKey": key, "thumb": "THUMB_DOWN", "tags": ["web"]}
    status, reply = _post(port, body)
    assert status == 200 and reply["duplicate"] is False
    [record] = _records_of(broker.bootstrap, [reply["eventId"]])
    assert (record.partition, record.offset) == (reply["partition"], int(reply["offset"]))
    assert record.message.feedback.thumb == events_pb2.THUMB_DOWN
    assert record.message.feedback.tags == ["web"] and record.message.policy_version == 9
    assert _post(port, body)[1]["duplicate"] is True
    forged = {**body, "generationId": GenerationIdSigner(b"f" * 32).issue(1), "idempotencyKey": "x"}
    expired = {**body, "generationId": SIGNER.issue(1, now=1000), "idempotencyKey": "y"}
    conflict = {**body, "thumb": "THUMB_UP"}
    cases = [
        (_post(port, body, key=None), 401, "UNAUTHENTICATED"),
        (_post(port, body, key="wrong-key-wrong-key"), 401, "UNAUTHENTICATED"),
        (_post(port, forged), 403, "PERMISSION_DENIED"),
        (_post(port, expired), 400, "FAILED_PRECONDITION"),
        (_post(port, conflict), 409, "ALREADY_EXISTS"),
        (_post(port, {**body, "thumb": 7}), 400, "INVALID_ARGUMENT"),
        (_post(port, b"{not json"), 400, "INVALID_ARGUMENT"),
        (_post(port, body, content_type="text/plain"), 415, "INVALID_ARGUMENT"),
        (_post(port, b"x" * (300 * 1024)), 413, "RESOURCE_EXHAUSTED"),
    ]
    for (status, reply), want_status, want_code in cases:
        assert (status, reply["error"]["status"]) == (want_status, want_code), reply


def test_http_wrong_method_and_path(server):
    port = server.service.http.port
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/feedback", timeout=10)
    assert caught.value.code == 405
    request = urllib.request.Request(f"http://127.0.0.1:{port}/nope", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 404


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost (the venv has no `cryptography`: openssl CLI)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
            str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_serves_grpc_and_http_and_refuses_plaintext(broker, certificate):
    cert, key = certificate
    config = _config(broker.bootstrap, tls_cert_file=str(cert), tls_key_file=str(key))
    running = server_for(FeedbackService(config), config, port=0).start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{running.port}", credentials) as channel:
            reply = feedback_pb2_grpc.FeedbackServiceStub(channel).SubmitFeedback(
                _thumb(), metadata=AUTH, timeout=10
            )
            assert reply.event_id
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as plain:
            stub = feedback_pb2_grpc.FeedbackServiceStub(plain)
            assert _code(lambda: stub.SubmitFeedback(_thumb(), metadata=AUTH, timeout=5)) == (
                grpc.StatusCode.UNAVAILABLE
            )
        trusted = ssl.create_default_context(cafile=str(cert))
        port = running.service.http.port
        status, reply = _post(port, _feedback_json(), scheme="https", context=trusted)
        assert status == 200 and reply["eventId"]
        with pytest.raises(urllib.error.URLError):
            _post(port, _feedback_json(), scheme="https", context=ssl.create_default_context())
    finally:
        running.stop()


def _feedback_json():
    return {"generationId": SIGNER.issue(1), "idempotencyKey": _key(), "score": {"value": 0.5}}
