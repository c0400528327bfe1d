"""The feedback service: authenticated, validated, acknowledged only once the broker has it."""

import time

import grpc
import pytest

from rlhf import bus
from rlhf.broker import EmbeddedBroker
from rlhf.ids import GenerationIdSigner
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc
from services.feedback.config import FeedbackConfig
from services.feedback.main import FeedbackService
from tests.conftest import API_KEY, AUTH, ID_KEY, TENANT, consume_all, scrape, serve

SIGNER = GenerationIdSigner(ID_KEY.encode())


def _config(bootstrap):
    return FeedbackConfig(
        kafka_bootstrap=bootstrap,
        generation_id_key=ID_KEY,
        api_keys=(f"{TENANT}={API_KEY}",),
        publish_timeout_seconds=3.0,
    )


@pytest.fixture(scope="module")
def server(broker):
    running = serve(FeedbackService(_config(broker.bootstrap)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield feedback_pb2_grpc.FeedbackServiceStub(channel)


def _thumb(gid=None, thumb=events_pb2.THUMB_UP):
    return feedback_pb2.SubmitFeedbackRequest(
        feedback=events_pb2.Feedback(
            generation_id=gid or SIGNER.issue(policy_version=4), idempotency_key="k1", thumb=thumb
        )
    )


def _code(call):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_accepted_feedback_is_on_the_topic_where_the_reply_says(stub, broker, server):
    request = _thumb()
    reply = stub.SubmitFeedback(request, metadata=AUTH)
    records = consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
    [record] = [r for r in records if r.message.event_id == reply.event_id]
    assert (record.partition, record.offset) == (reply.partition, reply.offset)
    assert record.key == request.feedback.generation_id
    assert record.message.tenant == TENANT and record.message.policy_version == 4
    assert record.message.feedback == request.feedback
    metrics = scrape(server)
    assert 'rlhf_feedback_thumbs_total{policy_version="4",thumb="up"}' in metrics


def test_missing_or_wrong_key_is_unauthenticated(stub):
    assert _code(lambda: stub.SubmitFeedback(_thumb())) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer not-the-key-at-all"),)
    assert _code(lambda: stub.SubmitFeedback(_thumb(), metadata=wrong)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_forged_unknown_and_malformed_input(stub):
    forged = GenerationIdSigner(b"f" * 32).issue(1)
    assert _code(lambda: stub.SubmitFeedback(_thumb(forged), metadata=AUTH)) == (
        grpc.StatusCode.PERMISSION_DENIED
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
        finally:
            running.stop()
