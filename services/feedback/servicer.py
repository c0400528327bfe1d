"""FeedbackService: authenticate, validate, publish, and answer only once the broker has it."""

from __future__ import annotations

import time
import uuid

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from rlhf import bus
from rlhf.auth import ApiKeys, Unauthenticated
from rlhf.bus import BusUnavailable, Publisher
from rlhf.ids import GenerationIdSigner
from rlhf.server import Rejected
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

from .validation import Limits, validate_feedback

ACCEPTED = Counter(
    "rlhf_feedback_accepted_total",
    "feedback events the broker acknowledged",
    ["tenant", "policy_version", "signal"],
)
THUMBS = Counter(
    "rlhf_feedback_thumbs_total",
    "thumbs by direction: the thumbs-up rate per policy version is the drift signal",
    ["policy_version", "thumb"],
)
REJECTED = Counter("rlhf_feedback_rejected_total", "submissions refused", ["reason"])
PUBLISH_SECONDS = Histogram(
    "rlhf_feedback_publish_seconds",
    "time for the broker to acknowledge a feedback event",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(
        self,
        api_keys: ApiKeys,
        signer: GenerationIdSigner,
        limits: Limits,
        publisher: Publisher,
        publish_timeout: float,
    ) -> None:
        self._api_keys = api_keys
        self._signer = signer
        self._limits = limits
        self._publisher = publisher
        self._publish_timeout = publish_timeout

    def SubmitFeedback(
        self, request: feedback_pb2.SubmitFeedbackRequest, context: grpc.ServicerContext
    ) -> feedback_pb2.SubmitFeedbackResponse:
        try:
            tenant = self._api_keys.tenant_for(context.invocation_metadata())
        except Unauthenticated as exc:
            REJECTED.labels("unauthenticated").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        try:
            return self._submit(tenant, request.feedback)
        except Rejected as exc:
            REJECTED.labels(exc.reason).inc()
            context.abort(exc.code, str(exc))

    def _submit(
        self, tenant: str, feedback: events_pb2.Feedback
    ) -> feedback_pb2.SubmitFeedbackResponse:
        claims = validate_feedback(feedback, self._signer, self._limits)
        received = Timestamp()
        received.GetCurrentTime()
        event = events_pb2.FeedbackEvent(
            event_id=uuid.uuid4().hex,
            tenant=tenant,
            feedback=feedback,
            policy_version=claims.policy_version,
            received_at=received,
        )
        started = time.perf_counter()
        try:
            partition, offset = self._publisher.publish(
                bus.FEEDBACK, feedback.generation_id, event, timeout=self._publish_timeout
            )
        except BusUnavailable as exc:
            raise Rejected(
                grpc.StatusCode.UNAVAILABLE,
                "broker_unavailable",
                f"feedback was NOT stored, retry later: {exc}",
            ) from exc
        PUBLISH_SECONDS.observe(time.perf_counter() - started)
        self._count(tenant, feedback, claims.policy_version)
        return feedback_pb2.SubmitFeedbackResponse(
            event_id=event.event_id, partition=partition, offset=offset
        )

    @staticmethod
    def _count(tenant: str, feedback: events_pb2.Feedback, version: int) -> None:
        signal = feedback.WhichOneof("signal")
        ACCEPTED.labels(tenant, str(version), signal).inc()
        if signal == "thumb":
            thumb = "up" if feedback.thumb == events_pb2.THUMB_UP else "down"
            THUMBS.labels(str(version), thumb).inc()
