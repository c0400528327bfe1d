"""The one small HTTP server for the services' HTTP endpoints (feedback's JSON API, the
playground): stdlib `ThreadingHTTPServer` with a bound on connections served at once (more are
closed at once), TLS handshakes off the accept loop with a timeout, and a stop that waits for
requests in flight. Each handler sets its own read `timeout`, so a slow or silent client cannot
pin a thread."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


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
            log.warning("HTTP connection limit reached; closing one from %s", client_address)
            self.shutdown_request(request)
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

    def shutdown_request(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
        request.close()


def content_length(headers: Mapping[str, str]) -> int | None:
    """The declared body length, or None if missing, malformed or chunked (not supported)."""
    raw = headers.get("content-length", "")
    # ASCII digits only (str.isdigit also takes "²"), and few enough for int() to parse.
    if "transfer-encoding" in headers or not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        return None
    return int(raw)
