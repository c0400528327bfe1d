"""FeedbackService over gRPC: a thin adapter between requests, status codes and FeedbackIngest."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from rlhf.server import Rejected, Undecodable, tolerant_parser
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

from .ingest import FeedbackIngest, Item, StreamIngest

SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


def _code_number(code: grpc.StatusCode) -> int:
    return code.value[0]


def stream_response(items: list[Item]) -> feedback_pb2.StreamFeedbackResponse:
    """One result per item read, in order: stored ones with their position, others with why."""
    response = feedback_pb2.StreamFeedbackResponse()
    add = response.results.add  # one call per result: a stream carries thousands
    stored = 0
    for item in items:
        where = item.stored
        if where is not None:
            add(
                index=item.index,
                idempotency_key=item.idempotency_key,
                event_id=where.event_id,
                partition=where.partition,
                offset=where.offset,
                duplicate=where.duplicate,
            )
            stored += 1
        else:
            assert item.rejected is not None
            add(
                index=item.index,
                idempotency_key=item.idempotency_key,
                code=_code_number(item.rejected.code),
                reason=item.rejected.reason,
                message=str(item.rejected),
            )
    response.stored, response.failed = stored, len(items) - stored
    return response


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, ingest: FeedbackIngest) -> None:
        self._ingest = ingest

    def register(self, server: grpc.Server) -> list[str]:
        """Like the generated add_..._to_server, with parsers that tolerate garbage."""
        handlers = {
            "SubmitFeedback": grpc.unary_unary_rpc_method_handler(
                self.SubmitFeedback,
                request_deserializer=tolerant_parser(feedback_pb2.SubmitFeedbackRequest.FromString),
                response_serializer=feedback_pb2.SubmitFeedbackResponse.SerializeToString,
            ),
            "StreamFeedback": grpc.stream_unary_rpc_method_handler(
                self.StreamFeedback,
                request_deserializer=tolerant_parser(feedback_pb2.StreamFeedbackRequest.FromString),
                response_serializer=feedback_pb2.StreamFeedbackResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        return [SERVICE_NAME]

    def SubmitFeedback(
        self,
        request: feedback_pb2.SubmitFeedbackRequest | Undecodable,
        context: grpc.ServicerContext,
    ) -> feedback_pb2.SubmitFeedbackResponse:
        try:
            tenant = self._ingest.authenticate(context.invocation_metadata())
            if isinstance(request, Undecodable):
                raise self._ingest.count_rejection(tenant, _undecodable(request))
            stored = self._ingest.submit(tenant, request.feedback)
        except Rejected as exc:
            context.abort(exc.code, str(exc))
        return feedback_pb2.SubmitFeedbackResponse(
            event_id=stored.event_id,
            partition=stored.partition,
            offset=stored.offset,
            duplicate=stored.duplicate,
        )

    def StreamFeedback(
        self,
        request_iterator: Iterator[feedback_pb2.StreamFeedbackRequest | Undecodable],
        context: grpc.ServicerContext,
    ) -> feedback_pb2.StreamFeedbackResponse:
        try:
            tenant = self._ingest.authenticate(context.invocation_metadata())
        except Rejected as exc:
            context.abort(exc.code, str(exc))
        stream = self._ingest.open_stream(tenant)
        # If the client goes away mid-stream, still settle what was sent so metrics stay true.
        with contextlib.suppress(grpc.RpcError):
            _read(stream, request_iterator)
        return stream_response(stream.finish())


def _read(
    stream: StreamIngest, requests: Iterator[feedback_pb2.StreamFeedbackRequest | Undecodable]
) -> None:
    """Feed items to the stream until the client closes it or the server must stop reading."""
    for request in requests:
        if isinstance(request, Undecodable):
            stream.add_undecodable(request.detail)
            return
        for feedback in request.items:
            if not stream.add(feedback):
                return


def _undecodable(request: Undecodable) -> Rejected:
    return Rejected(
        grpc.StatusCode.INVALID_ARGUMENT,
        "undecodable",
        f"request is not a SubmitFeedbackRequest: {request.detail}",
    )
