"""Edge validation of submitted feedback: pure functions, one status code per kind of fault.

Ownership: a generation id names the tenant whose app asked for it; only that tenant may rate it
(PERMISSION_DENIED otherwise). Ids issued while generation was open name no tenant and take
feedback from any.

Ranking consistency: every id of a ranking must be genuine, unexpired, the tenant's and listed
once (ids are canonical, so a listing twice cannot hide behind another spelling), and the ranking
must include the rated generation. Whether the ranked generations answer the same prompt is
proved from the prompt digest every id carries (`rlhf.ids.prompt_digest`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from rlhf.ids import (
    ExpiredGenerationId,
    ForgedGenerationId,
    GenerationClaims,
    GenerationIdSigner,
    InvalidGenerationId,
)
from rlhf.limits import MAX_USER_KEY
from rlhf.server import Rejected
from rlhf.v1 import events_pb2

MAX_IDEMPOTENCY_KEY = 128
MAX_TAGS = 16
MAX_TAG_CHARS = 64
THUMBS = (events_pb2.THUMB_UP, events_pb2.THUMB_DOWN)


@dataclass(frozen=True)
class Limits:
    max_text_chars: int
    max_ranking_size: int


def _invalid(reason: str, message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


def verify_id(signer: GenerationIdSigner, generation_id: str, tenant: str) -> GenerationClaims:
    """The claims of a genuine, unexpired id of `tenant`'s (or of no tenant's)."""
    try:
        claims = signer.verify(generation_id)
    except ForgedGenerationId as exc:
        raise Rejected(grpc.StatusCode.PERMISSION_DENIED, "forged_id", str(exc)) from exc
    except ExpiredGenerationId as exc:
        raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "expired_id", str(exc)) from exc
    except InvalidGenerationId as exc:
        raise _invalid("malformed_id", str(exc)) from exc
    if claims.tenant and claims.tenant != tenant:
        raise Rejected(
            grpc.StatusCode.PERMISSION_DENIED,
            "other_tenant",
            "this generation was asked for by another tenant; only it may rate it",
        )
    return claims


def _check_ranking(
    feedback: events_pb2.Feedback,
    claims: GenerationClaims,
    signer: GenerationIdSigner,
    limits: Limits,
    tenant: str,
) -> None:
    ids = list(feedback.ranking.generation_ids)
    if not 2 <= len(ids) <= limits.max_ranking_size:
        raise _invalid("bad_ranking", f"a ranking orders 2 to {limits.max_ranking_size} ids")
    if len(set(ids)) != len(ids):
        raise _invalid("bad_ranking", "a ranking lists each generation once")
    if feedback.generation_id not in ids:
        raise _invalid("bad_ranking", "the ranking must include generation_id")
    others = [verify_id(signer, other, tenant) for other in ids if other != feedback.generation_id]
    prompts = {c.prompt_hash for c in [claims, *others] if c.prompt_hash}
    if len(prompts) > 1:
        raise _invalid("ranking_prompt_mismatch", "ranked generations answer different prompts")


def _check_text(feedback: events_pb2.Feedback, limits: Limits) -> None:
    text = feedback.correction.text
    if not text.strip():
        raise _invalid("empty_correction", "a correction needs text")
    if len(text) > limits.max_text_chars:
        raise _invalid("too_long", f"correction exceeds {limits.max_text_chars} characters")


def _check_signal(
    feedback: events_pb2.Feedback,
    claims: GenerationClaims,
    signer: GenerationIdSigner,
    limits: Limits,
    tenant: str,
) -> None:
    signal = feedback.WhichOneof("signal")
    if signal is None:
        raise _invalid("no_signal", "feedback needs one of thumb, ranking, correction or score")
    if signal == "thumb" and feedback.thumb not in THUMBS:
        raise _invalid("bad_thumb", f"thumb must be THUMB_UP or THUMB_DOWN, got {feedback.thumb}")
    if signal == "ranking":
        _check_ranking(feedback, claims, signer, limits, tenant)
    if signal == "correction":
        _check_text(feedback, limits)
    if signal == "score":
        value = feedback.score.value
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise _invalid("bad_score", "score must be a number in [0, 1]")


def _check_idempotency_key(key: str) -> None:
    if not key:
        raise _invalid("missing_idempotency_key", "idempotency_key is required")
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise _invalid(
            "bad_idempotency_key",
            f"idempotency_key must be up to {MAX_IDEMPOTENCY_KEY} printable characters",
        )


def _check_user_key(key: str) -> None:
    if len(key) > MAX_USER_KEY or (key and not key.isprintable()):
        raise _invalid(
            "bad_user_key", f"user_key must be up to {MAX_USER_KEY} printable characters"
        )


def _check_annotations(feedback: events_pb2.Feedback, limits: Limits) -> None:
    """The optional comment and tags."""
    if len(feedback.comment) > limits.max_text_chars:
        raise _invalid("too_long", f"comment exceeds {limits.max_text_chars} characters")
    tags = feedback.tags
    if tags and (
        len(tags) > MAX_TAGS
        or any(not t.strip() or len(t) > MAX_TAG_CHARS or not t.isprintable() for t in tags)
    ):
        raise _invalid(
            "bad_tags", f"at most {MAX_TAGS} non-blank printable tags of {MAX_TAG_CHARS} characters"
        )


def validate_feedback(
    feedback: events_pb2.Feedback, signer: GenerationIdSigner, limits: Limits, tenant: str
) -> GenerationClaims:
    """Check everything about `tenant`'s submission; return the verified claims of its
    generation id."""
    if not feedback.generation_id:
        raise _invalid("missing_id", "generation_id is required")
    claims = verify_id(signer, feedback.generation_id, tenant)
    _check_signal(feedback, claims, signer, limits, tenant)
    _check_idempotency_key(feedback.idempotency_key)
    _check_user_key(feedback.user_key)
    _check_annotations(feedback, limits)
    return claims
