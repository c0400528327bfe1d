"""The feedback service as a real process (`python -m services.feedback`), killed mid-stream."""

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from rlhf import bus
from rlhf.broker import free_port
from rlhf.ids import GenerationIdSigner, feedback_event_id
from rlhf.joining import FeedbackJoin
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc
from tests.conftest import API_KEY, AUTH, ID_KEY, TENANT, consume_all
from tests.processes import start_service

SIGNER = GenerationIdSigner(ID_KEY.encode())
OK = 0
ITEMS = 1200


def start_feedback(bootstrap, port, log_path):
    env = {
        "RLHF_KAFKA_BOOTSTRAP": bootstrap,
        "RLHF_GENERATION_ID_KEY": ID_KEY,
        "RLHF_FEEDBACK_API_KEYS": f"{TENANT}={API_KEY}",
        "RLHF_PUBLISH_TIMEOUT_SECONDS": "3",
    }
    return start_service("services.feedback", env, port, log_path, timeout=30.0)


class Resender:
    """Streams items one per message until each is acknowledged, resending the rest, like an
    app would; a stream cut by the server's death acknowledges nothing."""

    def __init__(self, stub, items):
        self.stub, self.items = stub, {f.idempotency_key: f for f in items}
        self.acks = {}  # key -> FeedbackResult
        self.broken_streams = 0

    def run(self, deadline):
        while len(self.acks) < len(self.items) and time.monotonic() < deadline:
            pending = [k for k in self.items if k not in self.acks][:100]
            messages = (feedback_pb2.StreamFeedbackRequest(items=[self.items[k]]) for k in pending)
            try:
                reply = self.stub.StreamFeedback(messages, metadata=AUTH, timeout=20)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                self.broken_streams += 1
                time.sleep(0.1)
                continue
            self.acks.update((r.idempotency_key, r) for r in reply.results if r.code == OK)


@pytest.fixture
def service_log(tmp_path):
    path = tmp_path / "feedback.log"
    yield path
    if path.exists():
        print(path.read_text()[-3000:])


def test_service_killed_mid_stream_loses_nothing_acknowledged(broker, service_log):
    """SIGKILL: no drain, no flush, replies in flight lost. The client resends what was not
    acknowledged to the restarted service with the same keys. Events published before the kill
    whose acknowledgement never reached the client come back as copies under the same event id
    (the restarted process has no memory of them): N items in, exactly N distinct events on the
    topic, every acknowledgement where it said, and a consumer's join keeps exactly N."""
    port = free_port()
    items = [
        events_pb2.Feedback(
            generation_id=SIGNER.issue(5), idempotency_key=f"kill-{n}-{time.time_ns()}", thumb=1
        )
        for n in range(ITEMS)
    ]
    process = start_feedback(broker.bootstrap, port, service_log)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = Resender(feedback_pb2_grpc.FeedbackServiceStub(channel), items)
            thread = threading.Thread(target=client.run, args=(time.monotonic() + 60,))
            thread.start()
            assert _wait(lambda: len(client.acks) >= 300)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            assert _wait(lambda: client.broken_streams >= 1)
            process = start_feedback(broker.bootstrap, port, service_log)
            thread.join()
            # Resending already acknowledged items to the new process (nothing in its memory)
            # publishes them again: the copies carry the same event ids.
            again = feedback_pb2_grpc.FeedbackServiceStub(channel).StreamFeedback(
                iter([feedback_pb2.StreamFeedbackRequest(items=items[:50])]), metadata=AUTH
            )
            assert again.stored == 50
    finally:
        process.kill()
        process.wait(10)
    assert len(client.acks) == ITEMS
    expected = {feedback_event_id(TENANT, f.idempotency_key) for f in items}
    records = [
        r
        for r in consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
        if r.message.event_id in expected
    ]
    assert {r.message.event_id for r in records} == expected
    assert len(records) >= ITEMS + 50  # the copies are really there
    on_topic = {(r.partition, r.offset): r.message.event_id for r in records}
    assert all(on_topic[(r.partition, r.offset)] == r.event_id for r in client.acks.values())
    assert _joined_once(records, items) == ITEMS


def _joined_once(records, items):
    """How many feedback events a consumer's join (deduplicating by event id) joins."""
    join = FeedbackJoin()
    joined = 0
    for record in records:
        joined += len(join.add_feedback(record.message))
    for feedback in items:
        generation = events_pb2.GenerationEvent(generation_id=feedback.generation_id)
        joined += len(join.add_generation(generation))
    return joined


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_help_lists_the_new_settings():
    done = subprocess.run(
        [sys.executable, "-m", "services.feedback", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for variable in (
        "RLHF_FEEDBACK_HTTP_PORT",
        "RLHF_FEEDBACK_MAX_STREAM_ITEMS",
        "RLHF_FEEDBACK_STREAM_WINDOW",
        "RLHF_TLS_CERT_FILE",
        "RLHF_TLS_KEY_FILE",
    ):
        assert variable in done.stdout


def test_half_configured_tls_is_a_clear_start_up_error(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "RLHF_GENERATION_ID_KEY": ID_KEY,
        "RLHF_FEEDBACK_API_KEYS": f"{TENANT}={API_KEY}",
        "RLHF_TLS_CERT_FILE": str(tmp_path / "cert.pem"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.feedback"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert "RLHF_TLS_KEY_FILE" in done.stderr
