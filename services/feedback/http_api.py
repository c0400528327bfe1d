"""A small HTTP JSON endpoint for browsers and webhooks, over the same FeedbackIngest as gRPC.

`POST /v1/feedback` with `Authorization: Bearer <api key>`, `Content-Type: application/json` and
a Feedback in proto3 JSON, e.g. `{"generationId": "g2...", "idempotencyKey": "click-123",
"thumb": "THUMB_UP"}`. 200 answers `{"eventId", "partition", "offset", "duplicate"}` once the
broker stored it; errors answer `{"error": {"code", "status", "reason", "message"}}` with the gRPC
status mapped to HTTP as Google APIs do (400, 401, 403, 409, 429, 503; 413 for a body over the
limit). Same authentication, validation and delivery semantics as SubmitFeedback.

Stdlib only. Each connection gets a thread, at most `max_connections` at once (more are closed at
once); each request is one connection (HTTP/1.0), so stopping waits only for requests in flight.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

import grpc
from google.protobuf import json_format

from rlhf.http_server import BoundedHttpServer, content_length
from rlhf.server import Rejected, TlsIdentity
from rlhf.v1 import events_pb2, feedback_pb2

from .ingest import FeedbackIngest

log = logging.getLogger(__name__)

PATH = "/v1/feedback"
DRAIN_LIMIT = 4 * 1024 * 1024  # refused bodies up to this size are read and dropped
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNIMPLEMENTED: HTTPStatus.METHOD_NOT_ALLOWED,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}
# Refusals decided by HTTP framing rather than by the feedback itself.
BODY_TOO_LARGE = "body_too_large"
_FRAMING_STATUS = {
    BODY_TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "read_timeout": HTTPStatus.REQUEST_TIMEOUT,
    "length_required": HTTPStatus.LENGTH_REQUIRED,
    "unsupported_media_type": HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
}


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: dict[str, Any] | None
    headers: tuple[tuple[str, str], ...] = ()


def error_reply(rejected: Rejected) -> HttpReply:
    status = _FRAMING_STATUS.get(rejected.reason) or HTTP_STATUS.get(
        rejected.code, HTTPStatus.INTERNAL_SERVER_ERROR
    )
    body = {
        "error": {
            "code": int(status),
            "status": rejected.code.name,
            "reason": rejected.reason,
            "message": str(rejected),
        }
    }
    retry = (("Retry-After", "1"),) if rejected.code == grpc.StatusCode.UNAVAILABLE else ()
    return HttpReply(int(status), body, retry)


def _invalid(reason: str, message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


def parse_feedback(body: bytes) -> events_pb2.Feedback:
    """A Feedback from proto3 JSON; anything else is INVALID_ARGUMENT."""
    try:
        return json_format.Parse(body, events_pb2.Feedback())
    # Hostile JSON can fail in many ways (ParseError, RecursionError on deep nesting,
    # UnicodeError, ValueError from protobuf setters): each means the body is not a Feedback.
    except Exception as exc:
        raise _invalid("bad_json", f"body is not a Feedback in JSON: {exc}") from exc


class FeedbackHttpApi:
    """Requests to replies, without sockets: headers have lower-case names."""

    def __init__(
        self, ingest: FeedbackIngest, max_body_bytes: int, cors_origins: tuple[str, ...] = ()
    ) -> None:
        self._ingest = ingest
        self.max_body_bytes = max_body_bytes
        self._cors_origins = cors_origins

    def post(self, path: str, headers: Mapping[str, str], body: bytes | None) -> HttpReply:
        """Handle a POST; `body` is None when it was not read (no or too large Content-Length)."""
        if path.split("?", 1)[0] != PATH:
            return self._with_cors(headers, error_reply(_not_found(path)))
        try:
            tenant = self._ingest.authenticate([("authorization", headers.get("authorization"))])
            stored = self._ingest.submit(tenant, self._feedback_from(tenant, headers, body))
        except Rejected as exc:
            return self._with_cors(headers, error_reply(exc))
        answer = feedback_pb2.SubmitFeedbackResponse(
            event_id=stored.event_id,
            partition=stored.partition,
            offset=stored.offset,
            duplicate=stored.duplicate,
        )
        body_json = json_format.MessageToDict(answer, always_print_fields_with_no_presence=True)
        return self._with_cors(headers, HttpReply(HTTPStatus.OK, body_json))

    def _feedback_from(
        self, tenant: str, headers: Mapping[str, str], body: bytes | None
    ) -> events_pb2.Feedback:
        """Framing and JSON checks, counted here because the ingest core never sees them."""
        try:
            self._check_framing(headers)
            assert body is not None, "framing accepted the length, so the body was read"
            return parse_feedback(body)
        except Rejected as exc:
            raise self._ingest.count_rejection(tenant, exc) from exc

    def _check_framing(self, headers: Mapping[str, str]) -> None:
        """Refuse what is not a bounded JSON body."""
        length = content_length(headers)
        if length is None:
            raise Rejected(
                grpc.StatusCode.INVALID_ARGUMENT, "length_required", "Content-Length is required"
            )
        if length > self.max_body_bytes:
            raise Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                BODY_TOO_LARGE,
                f"body exceeds {self.max_body_bytes} bytes",
            )
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                "unsupported_media_type",
                "Content-Type must be application/json",
            )

    def body_allowed(self, headers: Mapping[str, str]) -> bool:
        """Whether the handler may read the body: its declared length is within the limit."""
        length = content_length(headers)
        return length is not None and length <= self.max_body_bytes

    def preflight(self, headers: Mapping[str, str]) -> HttpReply:
        """A CORS preflight: allowed origins may POST JSON with an Authorization header."""
        reply = HttpReply(
            HTTPStatus.NO_CONTENT,
            None,
            (
                ("Access-Control-Allow-Methods", "POST"),
                ("Access-Control-Allow-Headers", "authorization, content-type"),
                ("Access-Control-Max-Age", "600"),
            ),
        )
        return self._with_cors(headers, reply)

    def _with_cors(self, headers: Mapping[str, str], reply: HttpReply) -> HttpReply:
        origin = headers.get("origin", "")
        extra: tuple[tuple[str, str], ...] = ()
        if origin and ("*" in self._cors_origins or origin in self._cors_origins):
            extra = (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        elif origin:
            extra = (("Vary", "Origin"),)
        return HttpReply(reply.status, reply.body, reply.headers + extra)


def _timed_out() -> Rejected:
    return Rejected(
        grpc.StatusCode.DEADLINE_EXCEEDED, "read_timeout", "the body did not arrive in time"
    )


def _not_found(path: str) -> Rejected:
    return Rejected(grpc.StatusCode.NOT_FOUND, "not_found", f"no such endpoint: POST {path[:80]}")


class _Handler(BaseHTTPRequestHandler):
    api: FeedbackHttpApi  # set on the subclass FeedbackHttpServer makes
    server_version = "rlhf-feedback"
    timeout = 10  # seconds a client may take to send its request; slow ones cannot pin a thread

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)

    def _headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def do_POST(self) -> None:
        headers = self._headers()
        length, body = content_length(headers), None
        try:
            if self.api.body_allowed(headers):
                body = self.rfile.read(length or 0)
            elif length is not None and length <= DRAIN_LIMIT:
                self._discard(length)
        except TimeoutError:  # the body stopped short: say so, then close
            self.close_connection = True
            self._send(error_reply(_timed_out()))
            return
        self._send(self.api.post(self.path, headers, body))

    def _discard(self, length: int) -> None:
        """Read and drop a refused body, so the client sees our 413 rather than a reset
        connection (closing a socket with unread data resets it)."""
        while length > 0:
            chunk = self.rfile.read(min(length, 64 * 1024))
            if not chunk:
                return
            length -= len(chunk)

    def do_OPTIONS(self) -> None:
        self._send(self.api.preflight(self._headers()))

    def _refuse_method(self) -> None:
        rejected = Rejected(grpc.StatusCode.UNIMPLEMENTED, "method_not_allowed", f"use POST {PATH}")
        reply = error_reply(rejected)
        self._send(HttpReply(reply.status, reply.body, (("Allow", "POST, OPTIONS"),)))

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _refuse_method

    def _send(self, reply: HttpReply) -> None:
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class FeedbackHttpServer:
    """Serves FeedbackHttpApi on a port in a background thread."""

    def __init__(
        self,
        api: FeedbackHttpApi,
        host: str,
        port: int,
        tls: TlsIdentity | None = None,
        max_connections: int = 64,
        read_timeout: float = _Handler.timeout,
    ) -> None:
        handler = type("FeedbackHandler", (_Handler,), {"api": api, "timeout": read_timeout})
        context = tls.ssl_context() if tls is not None else None
        self._server = BoundedHttpServer(
            (host, port), handler, context, max_connections, read_timeout
        )
        self.port = int(self._server.server_address[1])
        self.tls = tls is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="feedback-http", daemon=True
        )

    def start(self) -> FeedbackHttpServer:
        self._thread.start()
        log.info("feedback HTTP API on port %d (%s)", self.port, "TLS" if self.tls else "plain")
        return self

    def stop(self) -> None:
        """Stop accepting, then wait for requests in flight (each bounded by the socket timeout)."""
        self._server.shutdown()
        self._server.server_close()
