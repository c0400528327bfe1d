"""Property-based: malformed and hostile input never crashes a handler and gets the right code.

Runs against the real handlers (the ingest core, the gRPC servicer on a real in-process server,
the HTTP API) with an in-memory broker, so each example is fast and the oracle can check that an
event was published if and only if the answer was OK.
"""

import base64
import json

import grpc
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.ids import GenerationIdSigner
from rlhf.server import Rejected, RunningServer
from rlhf.v1 import events_pb2, feedback_pb2
from services.feedback.config import FeedbackConfig
from services.feedback.http_api import FeedbackHttpApi
from services.feedback.main import FeedbackService
from tests.unit.feedback_fakes import API_KEY, AUTH, ID_KEY, SIGNER, FakePublisher, make_ingest

FORGER = GenerationIdSigner(b"f" * 32)
CODE_FOR_ID = {
    "valid": None,  # decided by the rest of the feedback
    "forged": grpc.StatusCode.PERMISSION_DENIED,
    "expired": grpc.StatusCode.FAILED_PRECONDITION,
    "garbage": grpc.StatusCode.INVALID_ARGUMENT,
}
FEEDBACK_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

texts = st.text(max_size=300)
versions = st.integers(min_value=0, max_value=2**40)


def _looks_like_a_token(text):
    parts = text.split(".")
    return len(parts) == 4 and parts[0] == "g2"


def _b64_of(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


_b64 = st.binary(max_size=60).map(_b64_of)
_ascii_b64 = st.text(alphabet="abcxyz0123456789:", max_size=60).map(lambda t: _b64_of(t.encode()))
_kids = st.one_of(st.just(SIGNER.key_id), st.binary(min_size=1, max_size=6).map(_b64_of))
generation_ids = st.one_of(
    st.tuples(st.just("valid"), versions.map(lambda v: SIGNER.issue(v))),
    st.tuples(st.just("forged"), versions.map(lambda v: FORGER.issue(v))),
    # well formed, signed with nothing (or naming a key we do not hold): a forgery too
    st.tuples(
        st.just("forged"),
        st.tuples(_kids, _ascii_b64, _b64)
        .filter(lambda p: p[1] and p[2])
        .map(lambda p: f"g2.{p[0]}.{p[1]}.{p[2]}"),
    ),
    st.tuples(st.just("expired"), versions.map(lambda v: SIGNER.issue(v, now=1000))),
    st.tuples(
        st.just("garbage"), st.text(max_size=300).filter(lambda t: not _looks_like_a_token(t))
    ),
)


@st.composite
def feedbacks(draw):
    """(kind of generation id, a Feedback with arbitrary, often hostile, fields)."""
    kind, generation_id = draw(generation_ids)
    feedback = events_pb2.Feedback(
        generation_id=generation_id,
        idempotency_key=draw(st.one_of(st.just(""), st.text(max_size=140))),
        comment=draw(texts),
        tags=draw(st.lists(st.text(max_size=80), max_size=20)),
    )
    signal = draw(st.sampled_from(["none", "thumb", "ranking", "correction", "score"]))
    if signal == "thumb":
        feedback.thumb = draw(st.integers(min_value=-(2**31), max_value=2**31 - 1))
    elif signal == "ranking":
        others = draw(st.lists(generation_ids.map(lambda pair: pair[1]), max_size=6))
        ranked = draw(st.permutations([generation_id, *others]))
        feedback.ranking.generation_ids.extend(ranked if draw(st.booleans()) else others)
    elif signal == "correction":
        feedback.correction.text = draw(texts)
    elif signal == "score":
        feedback.score.value = draw(st.floats(width=32))
    return kind, feedback


@SETTINGS
@given(feedbacks())
def test_any_feedback_is_stored_or_refused_with_the_right_code(case):
    kind, feedback = case
    publisher = FakePublisher()
    ingest = make_ingest(publisher)
    try:
        stored = ingest.submit("tenant-a", feedback)
    except Rejected as exc:
        assert exc.code in FEEDBACK_CODES
        if CODE_FOR_ID[kind] is not None:
            assert exc.code == CODE_FOR_ID[kind]
        assert publisher.records == []
        return
    assert kind == "valid"
    assert publisher.event_ids() == [stored.event_id]
    assert publisher.records[0][1].feedback == feedback


def _valid(signal):
    gid = SIGNER.issue(3)
    feedback = events_pb2.Feedback(generation_id=gid, idempotency_key="base-key", comment="ok")
    if signal == "thumb":
        feedback.thumb = events_pb2.THUMB_DOWN
    elif signal == "ranking":
        feedback.ranking.generation_ids.extend([SIGNER.issue(3), gid])
    elif signal == "correction":
        feedback.correction.text = "a better answer"
    else:
        feedback.score.value = 0.25
    return feedback


def _break(feedback, fault, value):
    """Apply one fault to a valid feedback; return the code it must get."""
    if fault == "forged id":
        feedback.generation_id = FORGER.issue(value)
        return grpc.StatusCode.PERMISSION_DENIED
    if fault == "expired id":
        feedback.generation_id = SIGNER.issue(value, now=0)
        return grpc.StatusCode.FAILED_PRECONDITION
    if fault == "forged ranked id":
        feedback.ranking.generation_ids.extend([feedback.generation_id, FORGER.issue(value)])
        del feedback.ranking.generation_ids[:-2]
        return grpc.StatusCode.PERMISSION_DENIED
    if fault == "long comment":
        feedback.comment = "c" * (101 + value % 1000)
    elif fault == "many tags":
        feedback.tags.extend(["t"] * (17 + value % 50))
    elif fault == "no key":
        feedback.idempotency_key = ""
    elif fault == "thumb out of enum":
        feedback.thumb = 3 + value % 1000
    elif fault == "score out of range":
        feedback.score.value = 1.0 + 1.0 / (1 + value % 7)
    elif fault == "no signal":
        feedback.ClearField(feedback.WhichOneof("signal"))
    return grpc.StatusCode.INVALID_ARGUMENT


@SETTINGS
@given(
    st.sampled_from(["thumb", "ranking", "correction", "score"]),
    st.sampled_from(
        [
            "forged id",
            "expired id",
            "forged ranked id",
            "long comment",
            "many tags",
            "no key",
            "thumb out of enum",
            "score out of range",
            "no signal",
        ]
    ),
    st.integers(min_value=0, max_value=10**6),
)
def test_one_fault_gets_its_own_code(signal, fault, value):
    feedback = _valid(signal)
    make_ingest().submit("tenant-a", feedback)  # the valid original is accepted
    expected = _break(feedback, fault, value)
    publisher = FakePublisher()
    with pytest.raises(Rejected) as caught:
        make_ingest(publisher).submit("tenant-a", feedback)
    assert caught.value.code == expected
    assert publisher.records == []


@pytest.fixture(scope="module")
def grpc_target():
    """The real servicer on a real in-process gRPC server, with the in-memory broker."""
    config = FeedbackConfig(
        generation_id_key=ID_KEY.decode(),
        api_keys=(f"tenant-a={API_KEY}",),
        max_text_chars=100,
        max_stream_items=50,
    )
    publisher = FakePublisher()
    server = RunningServer(
        FeedbackService(config, publisher=publisher), host="127.0.0.1", port=0, metrics_port=None
    ).start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel, publisher
    server.stop()


def _raw(channel, method, kind):
    path = f"/rlhf.v1.FeedbackService/{method}"
    factory = channel.unary_unary if kind == "unary" else channel.stream_unary
    return factory(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def _mutated_request():
    valid = feedback_pb2.SubmitFeedbackRequest(feedback=_valid("thumb")).SerializeToString()
    return st.one_of(
        st.binary(max_size=400),
        st.tuples(st.integers(0, len(valid)), st.binary(max_size=8)).map(
            lambda cut: valid[: cut[0]] + cut[1] + valid[cut[0] + len(cut[1]) :]
        ),
    )


@SETTINGS
@given(_mutated_request(), st.booleans())
def test_grpc_garbage_bytes_get_client_error_codes_never_internal(grpc_target, data, authed):
    channel, _ = grpc_target
    call = _raw(channel, "SubmitFeedback", "unary")
    try:
        reply = call(data, metadata=AUTH if authed else None, timeout=10)
    except grpc.RpcError as exc:
        if not authed:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            assert exc.code() in FEEDBACK_CODES, exc.details()
        return
    assert authed
    feedback_pb2.SubmitFeedbackResponse.FromString(reply)


@SETTINGS
@given(st.lists(_mutated_request(), max_size=5))
def test_grpc_garbage_stream_answers_per_item(grpc_target, messages):
    channel, publisher = grpc_target
    before = len(publisher.records)
    call = _raw(channel, "StreamFeedback", "stream")
    reply = feedback_pb2.StreamFeedbackResponse.FromString(
        call(iter(messages), metadata=AUTH, timeout=10)
    )
    assert [r.index for r in reply.results] == list(range(len(reply.results)))
    assert reply.stored + reply.failed == len(reply.results)
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED} | FEEDBACK_CODES
    numbers = {code.value[0] for code in allowed}
    assert {r.code for r in reply.results} <= numbers
    new_ids = {event_id for event_id in publisher.event_ids()[before:]}
    assert {r.event_id for r in reply.results if r.code == 0 and not r.duplicate} == new_ids


def _http_api():
    publisher = FakePublisher()
    return FeedbackHttpApi(make_ingest(publisher), max_body_bytes=2048), publisher


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children)
    ),
    max_leaves=20,
)


def _http_bodies():
    def as_json(feedback):
        return json_format.MessageToJson(feedback).encode()

    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        feedbacks().map(lambda case: as_json(case[1])),
        st.dictionaries(
            st.sampled_from(["generationId", "idempotencyKey", "thumb", "score", "tags", "x"]),
            json_values,
        ).map(lambda v: json.dumps(v).encode()),
    )


@SETTINGS
@given(
    body=_http_bodies(),
    auth=st.sampled_from([f"Bearer {API_KEY}", "", "Bearer wrong", "Basic abc"]),
    media=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]),
    length=st.one_of(st.just("exact"), st.text(max_size=6), st.sampled_from(["²", "1" * 5000])),
    path=st.sampled_from(["/v1/feedback", "/v1/feedback?x=1", "/", "/v1/feedbacks"]),
)
def test_http_api_answers_hostile_requests_with_mapped_codes(body, auth, media, length, path):
    api, publisher = _http_api()
    headers = {"authorization": auth, "content-type": media}
    headers["content-length"] = str(len(body)) if length == "exact" else length
    readable = api.body_allowed(headers)
    reply = api.post(path, headers, body if readable else None)
    json.dumps(reply.body)  # always a JSON document
    assert reply.status in {200, 400, 401, 403, 404, 409, 411, 413, 415}
    assert (reply.status == 200) == (len(publisher.records) == 1)
    if reply.status != 200:
        assert set(reply.body["error"]) == {"code", "status", "reason", "message"}
    if path.split("?")[0] != "/v1/feedback":
        assert reply.status == 404
    elif auth != f"Bearer {API_KEY}":
        assert reply.status == 401
    elif not readable:
        assert reply.status in (411, 413)
    elif media == "text/plain":
        assert reply.status == 415
