"""The one small HTTP server for the services' HTTP endpoints (generation's and feedback's APIs,
the playground, every /metrics): stdlib `ThreadingHTTPServer` with a bound on connections served
at once (more get 503 and are closed), TLS handshakes off the accept loop with a timeout, and a
stop that waits for requests in flight. Each handler sets its own read `timeout`, so a slow or
silent client cannot pin a thread."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from rlhf.auth import OPERATOR, READER, SERVICE, Credentials, Unauthenticated

log = logging.getLogger(__name__)


# What a write to a client that closed its connection raises, in plaintext and through TLS.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ssl.SSLEOFError)


class BoundedHttpServer(ThreadingHTTPServer):
    """Bounded concurrency, TLS handshakes off the accept loop, joins requests on close."""

    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type,
        tls: ssl.SSLContext | None,
        slots: int,
        handshake_timeout: float = 10.0,
    ) -> None:
        self._tls = tls
        self._slots = threading.BoundedSemaphore(slots)
        self._handshake_timeout = handshake_timeout
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("HTTP connection limit reached; refusing one from %s", client_address)
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self._tls is not None:
            request.settimeout(self._handshake_timeout)
            try:
                request = self._tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", client_address, exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A request that raised: through logging, not socketserver's traceback on stderr. A
        client gone mid-reply (Prometheus stopped during a scrape, a closed tab) is routine and
        gets a debug line."""
        error = sys.exc_info()[1]
        if isinstance(error, CLIENT_GONE):
            log.debug("HTTP client %s went away: %s", client_address, error)
            return
        log.exception("HTTP request from %s failed", client_address)

    def _refuse_busy(self, request: Any) -> None:
        """A 503 in plaintext (not through TLS: no handshake on the accept loop), then close."""
        if self._tls is None:
            with contextlib.suppress(OSError):
                request.settimeout(0.5)
                request.sendall(BUSY_REPLY)
        self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
        request.close()


BUSY_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 58\r\n\r\n"
    b'{"error": "too many connections at once; retry shortly"}\r\n'
)


def content_length(headers: Mapping[str, str]) -> int | None:
    """The declared body length, or None if missing, malformed or chunked (not supported)."""
    raw = headers.get("content-length", "")
    # ASCII digits only (str.isdigit also takes "²"), and few enough for int() to parse.
    if "transfer-encoding" in headers or not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        return None
    return int(raw)


class _MetricsHandler(BaseHTTPRequestHandler):
    credentials: Credentials | None  # set on the subclass MetricsHttpServer makes; None = open
    server_version = "rlhf-metrics"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http %s", format % args)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(HTTPStatus.NOT_FOUND, b"only /metrics here\n")
            return
        if self.credentials is not None:
            try:
                principal = self.credentials.identify(
                    [("authorization", self.headers.get("Authorization"))]
                )
            except Unauthenticated as exc:
                self._reply(HTTPStatus.UNAUTHORIZED, f"{exc}\n".encode(), bearer=True)
                return
            if principal.role not in (READER, OPERATOR, SERVICE):
                self._reply(HTTPStatus.FORBIDDEN, b"/metrics needs a reader key\n")
                return
        self._reply(HTTPStatus.OK, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        bearer: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if bearer:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)


class MetricsHttpServer:
    """Prometheus /metrics on the bounded server: TLS with the service's identity when it has
    one, and, unless `credentials` is None, only for reader, operator and service keys."""

    def __init__(
        self,
        address: tuple[str, int],
        tls: ssl.SSLContext | None,
        credentials: Credentials | None,
        read_timeout: float = 10.0,
        max_connections: int = 8,
    ) -> None:
        handler = type(
            "MetricsHandler",
            (_MetricsHandler,),
            {"credentials": credentials, "timeout": read_timeout},
        )
        self._server = BoundedHttpServer(address, handler, tls, max_connections, read_timeout)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
