import grpc
import pytest

from rlhf.ids import GenerationIdSigner, prompt_digest
from rlhf.server import Rejected
from rlhf.v1 import events_pb2
from services.feedback.validation import Limits, validate_feedback

SIGNER = GenerationIdSigner(b"k" * 32)
LIMITS = Limits(max_text_chars=100, max_ranking_size=4)


def Feedback(**fields):
    """A Feedback with an idempotency key unless the test sets one."""
    fields.setdefault("idempotency_key", "key-1")
    return events_pb2.Feedback(**fields)


TENANT = "acme"


def _rejection(feedback, tenant=TENANT):
    with pytest.raises(Rejected) as caught:
        validate_feedback(feedback, SIGNER, LIMITS, tenant)
    return caught.value


def _code(feedback):
    return _rejection(feedback).code


def test_valid_thumb_returns_claims():
    gid = SIGNER.issue(policy_version=3)
    claims = validate_feedback(
        Feedback(generation_id=gid, thumb=events_pb2.THUMB_UP), SIGNER, LIMITS, TENANT
    )
    assert claims.policy_version == 3


def test_id_faults_map_to_their_codes():
    forged = GenerationIdSigner(b"z" * 32).issue(1)
    expired = SIGNER.issue(1, now=0)
    up = events_pb2.THUMB_UP
    assert _code(Feedback(thumb=up)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(Feedback(generation_id="junk", thumb=up)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(Feedback(generation_id=forged, thumb=up)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(Feedback(generation_id=expired, thumb=up)) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "missing_idempotency_key"),
        ("k" * 129, "bad_idempotency_key"),
        ("a\nb", "bad_idempotency_key"),
    ],
)
def test_idempotency_key_is_required_and_bounded(key, reason):
    feedback = Feedback(generation_id=SIGNER.issue(1), thumb=1, idempotency_key=key)
    rejected = _rejection(feedback)
    assert (rejected.code, rejected.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


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
    feedback = Feedback(generation_id=SIGNER.issue(1), **signal)
    assert _code(feedback) == grpc.StatusCode.INVALID_ARGUMENT


def _ranking(rated, ids):
    return Feedback(generation_id=rated, ranking=events_pb2.Ranking(generation_ids=ids))


def test_rankings_are_checked():
    a, b = SIGNER.issue(1), SIGNER.issue(1)
    validate_feedback(_ranking(a, [b, a]), SIGNER, LIMITS, TENANT)
    for ids in ([a], [a, a], [b, SIGNER.issue(1)], [a, b, *(SIGNER.issue(1) for _ in range(3))]):
        assert _code(_ranking(a, ids)) == grpc.StatusCode.INVALID_ARGUMENT
    forged = GenerationIdSigner(b"z" * 32).issue(1)
    assert _code(_ranking(a, [a, forged])) == grpc.StatusCode.PERMISSION_DENIED
    expired = SIGNER.issue(1, now=0)
    assert _code(_ranking(a, [a, expired])) == grpc.StatusCode.FAILED_PRECONDITION


def test_ranking_of_answers_to_different_prompts_is_refused_when_ids_prove_it():
    """Ids bound to their prompt prove "same prompt"; ids without a digest cannot be checked."""
    hello, bye = prompt_digest("Hello?"), prompt_digest("Bye?")
    a, b = SIGNER.issue(1, prompt_hash=hello), SIGNER.issue(2, prompt_hash=hello)
    validate_feedback(_ranking(a, [a, b]), SIGNER, LIMITS, TENANT)
    other = SIGNER.issue(1, prompt_hash=bye)
    rejected = _rejection(_ranking(a, [other, b, a]))
    assert (rejected.code, rejected.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "ranking_prompt_mismatch",
    )
    unbound = SIGNER.issue(1)  # issued without a digest: accepted, unchecked
    validate_feedback(_ranking(a, [unbound, a]), SIGNER, LIMITS, TENANT)


def test_sizes_are_bounded():
    gid, up = SIGNER.issue(1), events_pb2.THUMB_UP
    validate_feedback(
        Feedback(generation_id=gid, thumb=up, comment="c" * 100, tags=["t" * 64] * 16),
        SIGNER,
        LIMITS,
        TENANT,
    )
    assert _code(Feedback(generation_id=gid, thumb=up, comment="c" * 101)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    for tags in (["t"] * 17, ["t" * 65], [" "], ["a\x00b"]):
        assert _code(Feedback(generation_id=gid, thumb=up, tags=tags)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )


def test_only_the_tenant_that_asked_may_rate_a_generation():
    up = events_pb2.THUMB_UP
    mine = SIGNER.issue(1, prompt_hash=prompt_digest("q"), tenant=TENANT)
    theirs = SIGNER.issue(1, prompt_hash=prompt_digest("q"), tenant="globex")
    assert validate_feedback(Feedback(generation_id=mine, thumb=up), SIGNER, LIMITS, TENANT)
    rejected = _rejection(Feedback(generation_id=theirs, thumb=up))
    assert (rejected.code, rejected.reason) == (grpc.StatusCode.PERMISSION_DENIED, "other_tenant")
    # Nor may another tenant's answer be smuggled into a ranking.
    rejected = _rejection(_ranking(mine, [mine, theirs]))
    assert (rejected.code, rejected.reason) == (grpc.StatusCode.PERMISSION_DENIED, "other_tenant")
    # Ids from an open generation service belong to no tenant: anyone's.
    open_id = SIGNER.issue(1, prompt_hash=prompt_digest("q"))
    validate_feedback(Feedback(generation_id=open_id, thumb=up), SIGNER, LIMITS, "globex")


def test_user_key_is_bounded():
    gid, up = SIGNER.issue(1), events_pb2.THUMB_UP
    validate_feedback(
        Feedback(generation_id=gid, thumb=up, user_key="u" * 128), SIGNER, LIMITS, TENANT
    )
    for key in ("u" * 129, "a\nb"):
        rejected = _rejection(Feedback(generation_id=gid, thumb=up, user_key=key))
        assert rejected.reason == "bad_user_key"
