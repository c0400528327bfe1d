import grpc
import pytest

from rlhf.ids import GenerationIdSigner
from rlhf.server import Rejected
from rlhf.v1 import events_pb2
from services.feedback.validation import Limits, validate_feedback

SIGNER = GenerationIdSigner(b"k" * 32)
LIMITS = Limits(max_text_chars=100, max_ranking_size=4)


def _code(feedback):
    with pytest.raises(Rejected) as caught:
        validate_feedback(feedback, SIGNER, LIMITS)
    return caught.value.code


def test_valid_thumb_returns_claims():
    gid = SIGNER.issue(policy_version=3)
    claims = validate_feedback(
        events_pb2.Feedback(generation_id=gid, thumb=events_pb2.THUMB_UP), SIGNER, LIMITS
    )
    assert claims.policy_version == 3


def test_id_faults_map_to_their_codes():
    forged = GenerationIdSigner(b"z" * 32).issue(1)
    expired = SIGNER.issue(1, now=0)
    up = events_pb2.THUMB_UP
    assert _code(events_pb2.Feedback(thumb=up)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(events_pb2.Feedback(generation_id="junk", thumb=up)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert _code(events_pb2.Feedback(generation_id=forged, thumb=up)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert _code(events_pb2.Feedback(generation_id=expired, thumb=up)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )


@pytest.mark.parametrize(
    "signal",
    [
        {},
        {"thumb": events_pb2.THUMB_UNSPECIFIED},
        {"thumb": 7},
        {"correction": events_pb2.Correction(text="  ")},
        {"correction": events_pb2.Correction(text="x" * 101)},
        {"score": events_pb2.ScalarScore(value=1.5)},
        {"score": events_pb2.ScalarScore(value=float("nan"))},
    ],
)
def test_bad_signals_are_invalid(signal):
    feedback = events_pb2.Feedback(generation_id=SIGNER.issue(1), **signal)
    assert _code(feedback) == grpc.StatusCode.INVALID_ARGUMENT


def test_rankings_are_checked():
    a, b = SIGNER.issue(1), SIGNER.issue(1)
    good = events_pb2.Feedback(generation_id=a, ranking=events_pb2.Ranking(generation_ids=[b, a]))
    validate_feedback(good, SIGNER, LIMITS)
    for ids in ([a], [a, a], [b, SIGNER.issue(1)], [a, b, *(SIGNER.issue(1) for _ in range(3))]):
        bad = events_pb2.Feedback(generation_id=a, ranking=events_pb2.Ranking(generation_ids=ids))
        assert _code(bad) == grpc.StatusCode.INVALID_ARGUMENT
    forged = GenerationIdSigner(b"z" * 32).issue(1)
    with_forged = events_pb2.Feedback(
        generation_id=a, ranking=events_pb2.Ranking(generation_ids=[a, forged])
    )
    assert _code(with_forged) == grpc.StatusCode.PERMISSION_DENIED


def test_sizes_are_bounded():
    gid, up = SIGNER.issue(1), events_pb2.THUMB_UP
    assert _code(events_pb2.Feedback(generation_id=gid, thumb=up, comment="c" * 101)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert _code(events_pb2.Feedback(generation_id=gid, thumb=up, tags=["t"] * 17)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert _code(events_pb2.Feedback(generation_id=gid, thumb=up, idempotency_key="k" * 129)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
