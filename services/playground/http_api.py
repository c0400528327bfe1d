"""The playground's HTTP side: the static page and a small same-origin API in front of the
generation and feedback HTTP APIs.

Routes: GET `/`, `/app.js`, `/style.css` (files from `static/`, no build step); POST, GET and
DELETE `/api/session` (sign in with an API key, ask, sign out); POST `/api/chat` (an OpenAI chat
completion, streamed back as the generation service's server-sent events); POST `/api/feedback`
(a Feedback in proto3 JSON, relayed to the feedback service); GET `/api/status` (the panel).

The person pastes their tenant's API key once; it stays in this process's memory, found by a
random session id in an HttpOnly, SameSite=Strict cookie, and is presented to generation and
feedback as `Authorization: Bearer`. The page never holds it and this process has no key of its
own. State-changing requests must be JSON from this origin (CSRF), every page carries a strict
Content-Security-Policy (scripts and styles from this origin only), bodies are bounded, and every
upstream call has a timeout.
"""

from __future__ import annotations

import http.client
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rlhf.http_server import BoundedHttpServer, content_length
from rlhf.server import TlsIdentity

from .config import PlaygroundConfig

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
COOKIE = "rlhf_playground"
MAX_BODY_BYTES = 64 * 1024
MAX_KEY_CHARS = 256
CHAT_ROLES = ("user", "assistant")
MAX_MESSAGES = 64
HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class Refused(Exception):
    """A request this process answers with an error of its own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Sessions:
    """Signed-in people: random session id -> (API key, expiry), bounded, oldest forgotten."""

    def __init__(self, ttl_seconds: float, capacity: int) -> None:
        self._ttl = ttl_seconds
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, api_key: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._entries[token] = (api_key, time.monotonic() + self._ttl)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return token

    def key(self, token: str | None) -> str | None:
        if not token:
            return None
        with self._lock:
            entry = self._entries.get(token)
            if entry is None or entry[1] < time.monotonic():
                self._entries.pop(token, None)
                return None
            return entry[0]

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._entries.pop(token or "", None)


@dataclass(frozen=True)
class Upstream:
    """One HTTP(S) call at a time to generation or feedback, with a socket timeout."""

    timeout: float

    def open(
        self, method: str, url: str, api_key: str, body: bytes | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """The connection and its response; the caller closes the connection."""
        parts = urlsplit(url)
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = kind(parts.hostname or "127.0.0.1", parts.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            path = parts.path or "/"
            connection.request(method, path, body=body, headers=headers)
            return connection, connection.getresponse()
        except OSError as exc:
            connection.close()
            raise Refused(HTTPStatus.BAD_GATEWAY, f"{parts.netloc} did not answer: {exc}") from exc


def chat_request(body: Any, max_new_tokens: int, temperature: float) -> dict[str, Any]:
    """The OpenAI request the page's {"messages", "n"} becomes; raises Refused."""
    if not isinstance(body, dict):
        raise Refused(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise Refused(HTTPStatus.BAD_REQUEST, f"messages: a list of 1 to {MAX_MESSAGES}")
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in CHAT_ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise Refused(HTTPStatus.BAD_REQUEST, "each message: a role (user, assistant), text")
    n = body.get("n", 1)
    if n not in (1, 2):
        raise Refused(HTTPStatus.BAD_REQUEST, "n must be 1 or 2")
    return {
        "model": "policy",
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "n": n,
        "max_tokens": max_new_tokens,
        "temperature": temperature,
        "stream": True,
    }


def _cookie_token(header: str | None) -> str | None:
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE:
            return value
    return None


class PlaygroundHandler(BaseHTTPRequestHandler):
    config: PlaygroundConfig  # the rest is set on the subclass PlaygroundHttpServer makes
    sessions: Sessions
    upstream: Upstream
    status: Callable[[], dict[str, Any]]
    files: Mapping[str, tuple[bytes, str]]
    secure: bool
    server_version = "rlhf-playground"
    timeout = 10  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)

    # -- plumbing ---------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        for name, value in HEADERS + extra:
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", extra)

    def _refuse(self, exc: Refused) -> None:
        self._json(exc.status, {"error": {"message": str(exc), "type": "playground"}})

    def _token(self) -> str | None:
        return _cookie_token(self.headers.get("Cookie"))

    def _key(self) -> str:
        key = self.sessions.key(self._token())
        if key is None:
            raise Refused(HTTPStatus.UNAUTHORIZED, "sign in with your API key first")
        return key

    def _same_origin(self) -> None:
        """State changes only from this origin: browsers send Origin on such requests, and a
        cross-site page cannot send JSON without a CORS preflight this server never answers."""
        origin = self.headers.get("Origin")
        scheme = "https" if self.secure else "http"
        if origin is not None and origin != f"{scheme}://{self.headers.get('Host', '')}":
            raise Refused(HTTPStatus.FORBIDDEN, "cross-origin requests are refused")

    def _body(self) -> bytes:
        length = content_length({k.lower(): v for k, v in self.headers.items()})
        if length is None:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        if length > MAX_BODY_BYTES:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
        media = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be JSON")
        return self.rfile.read(length)

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body())
        except ValueError as exc:
            raise Refused(HTTPStatus.BAD_REQUEST, "the body is not JSON") from exc

    def _cookie(self, token: str, max_age: int) -> tuple[tuple[str, str], ...]:
        secure = "; Secure" if self.secure else ""
        value = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        return (("Set-Cookie", value),)

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path in self.files:
                body, content_type = self.files[path]
                self._send(HTTPStatus.OK, body, content_type)
            elif path == "/api/session":
                self._json(
                    HTTPStatus.OK, {"signedIn": self.sessions.key(self._token()) is not None}
                )
            elif path == "/api/status":
                self._key()
                self._json(HTTPStatus.OK, self.status())
            else:
                raise Refused(HTTPStatus.NOT_FOUND, f"no such page: {path[:80]}")
        except Refused as exc:
            self._refuse(exc)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            self._same_origin()
            if path == "/api/session":
                self._sign_in()
            elif path == "/api/chat":
                self._chat()
            elif path == "/api/feedback":
                self._feedback()
            else:
                raise Refused(HTTPStatus.NOT_FOUND, f"no such endpoint: {path[:80]}")
        except Refused as exc:
            self._refuse(exc)

    def do_DELETE(self) -> None:
        try:
            self._same_origin()
            if self.path.split("?", 1)[0] != "/api/session":
                raise Refused(HTTPStatus.NOT_FOUND, "no such endpoint")
            self.sessions.drop(self._token())
            self._json(HTTPStatus.OK, {"signedIn": False}, self._cookie("", 0))
        except Refused as exc:
            self._refuse(exc)

    def _sign_in(self) -> None:
        body = self._json_body()
        key = body.get("apiKey") if isinstance(body, dict) else None
        if not isinstance(key, str) or not 16 <= len(key) <= MAX_KEY_CHARS or not key.isprintable():
            raise Refused(HTTPStatus.BAD_REQUEST, "an API key is 16 to 256 printable characters")
        # The generation API checks keys when it has any (as under `make up`); otherwise the
        # feedback service is the first to see a wrong key, and the page asks again then.
        connection, reply = self.upstream.open("GET", f"{self._generation()}/v1/models", key)
        try:
            reply.read()
        finally:
            connection.close()
        if reply.status == HTTPStatus.UNAUTHORIZED:
            raise Refused(HTTPStatus.UNAUTHORIZED, "the generation service refused this key")
        if reply.status != HTTPStatus.OK:
            raise Refused(HTTPStatus.BAD_GATEWAY, f"the generation service said {reply.status}")
        self.sessions.drop(self._token())
        token = self.sessions.create(key)
        max_age = int(self.config.session_hours * 3600)
        self._json(HTTPStatus.OK, {"signedIn": True}, self._cookie(token, max_age))

    def _generation(self) -> str:
        return self.config.generation_url.rstrip("/")

    def _chat(self) -> None:
        key = self._key()
        request = chat_request(
            self._json_body(), self.config.max_new_tokens, self.config.temperature
        )
        url = f"{self._generation()}/v1/chat/completions"
        connection, reply = self.upstream.open("POST", url, key, json.dumps(request).encode())
        try:
            if reply.status != HTTPStatus.OK:
                self._relay_refusal(reply)
                return
            self.send_response(HTTPStatus.OK)
            for name, value in HEADERS:
                self.send_header(name, value)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                while line := reply.readline(MAX_BODY_BYTES):
                    self.wfile.write(line)
                    if line == b"\n":  # the end of one event
                        self.wfile.flush()
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                log.info("chat reader went away")
            except OSError as exc:  # generation stopped answering mid-stream
                message = f"the generation service stopped answering: {exc}"
                error = {"error": {"message": message, "type": "playground"}}
                self.wfile.write(b"data: " + json.dumps(error).encode() + b"\n\n")
        finally:
            connection.close()

    def _feedback(self) -> None:
        key = self._key()
        body = self._body()
        connection, reply = self.upstream.open("POST", self.config.feedback_url, key, body)
        try:
            if reply.status != HTTPStatus.OK:
                self._relay_refusal(reply)
                return
            self._send(HTTPStatus.OK, reply.read(MAX_BODY_BYTES), "application/json")
        finally:
            connection.close()

    def _relay_refusal(self, reply: http.client.HTTPResponse) -> None:
        """An upstream error as it came (both speak JSON errors with `error.message`); a
        refused key also ends the session, so the page asks for the key again."""
        body = reply.read(MAX_BODY_BYTES)
        if reply.status == HTTPStatus.UNAUTHORIZED:
            self.sessions.drop(self._token())
        try:
            json.loads(body)
        except ValueError:
            message = body.decode(errors="replace")[:200] or f"HTTP {reply.status}"
            body = json.dumps({"error": {"message": message, "type": "upstream"}}).encode()
        self._send(reply.status, body, "application/json")


class PlaygroundHttpServer:
    """Serves the page and its API on a port in a background thread."""

    def __init__(
        self,
        config: PlaygroundConfig,
        status: Callable[[], dict[str, Any]],
        tls: TlsIdentity | None = None,
    ) -> None:
        files = {path: ((STATIC / name).read_bytes(), kind) for path, (name, kind) in FILES.items()}
        attributes = {
            "config": config,
            "sessions": Sessions(config.session_hours * 3600, config.max_sessions),
            "upstream": Upstream(config.upstream_timeout_seconds),
            "status": staticmethod(status),
            "files": files,
            "secure": tls is not None,
        }
        handler = type("BoundPlaygroundHandler", (PlaygroundHandler,), attributes)
        context = tls.ssl_context() if tls is not None else None
        self._server = BoundedHttpServer(
            (config.grpc_host, config.http_port),
            handler,
            context,
            config.max_connections,
            PlaygroundHandler.timeout,
        )
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="playground-http", daemon=True
        )

    def start(self) -> PlaygroundHttpServer:
        self._thread.start()
        log.info("playground on port %d", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
