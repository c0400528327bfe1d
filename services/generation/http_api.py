"""The generation service's HTTP API over GenerationCore: text-generation-inference routes and
OpenAI chat completions.

TGI routes: POST `/` (TGI's client posts here; `"stream": true` answers with server-sent
events), POST `/generate`, POST `/generate_stream`, GET `/info`, GET `/health`, so apps written
against TGI (including the official `text-generation` client) work unchanged. OpenAI routes:
POST `/v1/chat/completions`, GET `/v1/models` (see `openai_api.py`). Replies also carry the
signed `generation_id` and `policy_version` (extra fields clients ignore) and the
`x-generation-id` header, to attach feedback. Every route but `/health` needs `Authorization:
Bearer <key>`, an app's key (its tenant is bound into the ids) or a service key, unless
generation is open (RLHF_GENERATION_OPEN).

Served by the bounded HTTP server (`rlhf.http_server`): at most RLHF_HTTP_MAX_CONNECTIONS at once
(more get 503), a read timeout on every connection, TLS with the service's identity. Framing is
checked before anything else: no Content-Length (or chunked) is 411, a malformed one 400, a body
over 1 MiB 413; a body that is not JSON (deeply nested, lone surrogates, invalid UTF-8) is a
validation error, and anything unexpected a 500: a request always gets a status.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

import grpc

from rlhf import decoding
from rlhf.auth import APP, SERVICE, Credentials, Unauthenticated
from rlhf.http_server import BoundedHttpServer, content_length
from rlhf.models import serving_dtype
from rlhf.server import Rejected, TlsIdentity
from rlhf.v1 import common_pb2

from . import openai_api
from .config import MAX_CHOICES
from .core import REJECTED, GenerationCore, Outcome, Prepared

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
DRAIN_LIMIT = 4 * MAX_BODY_BYTES  # refused bodies up to this size are read, so the client
# sees the status rather than a reset connection
FINISH_REASONS = {
    decoding.EOS: "eos_token",
    decoding.STOP: "stop_sequence",
    decoding.LENGTH: "length",
}
# Status code and TGI error_type for each refusal, as TGI's client expects them.
HTTP_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (HTTPStatus.UNPROCESSABLE_ENTITY, "validation"),
    grpc.StatusCode.UNAUTHENTICATED: (HTTPStatus.UNAUTHORIZED, "authentication"),
    grpc.StatusCode.PERMISSION_DENIED: (HTTPStatus.FORBIDDEN, "authentication"),
    grpc.StatusCode.NOT_FOUND: (HTTPStatus.NOT_FOUND, "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (HTTPStatus.TOO_MANY_REQUESTS, "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (HTTPStatus.SERVICE_UNAVAILABLE, "generation"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (HTTPStatus.GATEWAY_TIMEOUT, "generation"),
}
# TGI parameters this server does not implement; refused rather than silently ignored.
UNSUPPORTED = ("repetition_penalty", "frequency_penalty", "typical_p", "grammar", "top_n_tokens")


def _invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", message)


class FramingRejected(Rejected):
    """A request refused for its HTTP framing, with the HTTP status that says so."""

    def __init__(self, http_status: int, reason: str, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, reason, message)
        self.http_status = http_status


def parse_json(raw: bytes, empty: Any) -> Any:
    """A request body as JSON (`empty` for no body); INVALID_ARGUMENT for anything that is not
    JSON a service can carry: malformed, invalid UTF-8, nested beyond the parser's recursion
    limit, or holding lone surrogates (no protobuf string or UTF-8 reply can hold them)."""
    try:
        body = json.loads(raw) if raw else empty
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError as exc:
        raise _invalid("body is not JSON: nested too deeply") from exc
    except UnicodeError as exc:
        raise _invalid(f"body is not JSON text: {exc.reason}") from exc
    except ValueError as exc:
        raise _invalid(f"body is not JSON: {exc}") from exc
    return body


def sampling_from_tgi(parameters: dict[str, Any]) -> common_pb2.SamplingParams:
    """Map TGI `parameters` onto ours: sampling is on when asked for or implied by its knobs."""
    for name in UNSUPPORTED:
        if parameters.get(name) not in (None, 1.0):
            raise _invalid(f"parameter {name!r} is not supported by this server")
    if (parameters.get("best_of") or 1) != 1 or parameters.get("watermark"):
        raise _invalid("best_of and watermark are not supported by this server")
    knobs = ("temperature", "top_p", "top_k")
    sample = bool(parameters.get("do_sample")) or any(parameters.get(k) is not None for k in knobs)
    try:
        params = common_pb2.SamplingParams(
            max_new_tokens=int(parameters.get("max_new_tokens") or 0),
            temperature=float(parameters.get("temperature") or 1.0) if sample else 0.0,
            top_p=float(parameters.get("top_p") or 0.0),
            top_k=int(parameters.get("top_k") or 0),
            stop=[str(s) for s in parameters.get("stop") or []],
        )
        if parameters.get("seed") is not None:
            params.seed = int(parameters["seed"])
    except (TypeError, ValueError) as exc:
        raise _invalid(f"bad parameters: {exc}") from exc
    return params


class GenerationHandler(BaseHTTPRequestHandler):
    core: GenerationCore  # set on the subclass made by GenerationHttpServer
    model_name: str
    credentials: Credentials | None  # None: generation is open
    server_version = "rlhf-generation"
    timeout = 10.0  # read timeout (RLHF_READ_TIMEOUT_SECONDS, set on the subclass)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)

    # -- plumbing ---------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, exc: Rejected) -> None:
        """A refusal in TGI's error shape."""
        status, error_type = HTTP_ERRORS.get(
            exc.code, (HTTPStatus.INTERNAL_SERVER_ERROR, "generation")
        )
        status = getattr(exc, "http_status", None) or status
        headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else {}
        self._send_json(status, {"error": str(exc), "error_type": error_type}, headers)

    def _send_openai_error(self, exc: Rejected) -> None:
        status, body = openai_api.error_body(exc)
        headers = {}
        if status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        elif status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
            headers["Retry-After"] = "1"
        self._send_json(status, body, headers)

    def _refuse(self, exc: Rejected, openai: bool) -> None:
        if openai:
            self._send_openai_error(exc)
        else:
            self._send_error(exc)

    def _read_raw(self) -> bytes:
        """The body, bounded: 411 without a length (chunked bodies are not taken), 400 for a
        length that is not a plain number, 413 above the limit (the body is read and dropped,
        up to a bound, so the client sees the status)."""
        headers = {name.lower(): value for name, value in self.headers.items()}
        length = content_length(headers)
        if length is None:
            if "content-length" not in headers or "transfer-encoding" in headers:
                raise FramingRejected(
                    HTTPStatus.LENGTH_REQUIRED, "length_required", "Content-Length is required"
                )
            raise FramingRejected(
                HTTPStatus.BAD_REQUEST, "bad_content_length", "Content-Length is not a number"
            )
        if length > MAX_BODY_BYTES:
            if length <= DRAIN_LIMIT:
                self._discard(length)
            raise FramingRejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "body_too_large",
                f"request body exceeds {MAX_BODY_BYTES} bytes",
            )
        try:
            raw = self.rfile.read(length)
        except TimeoutError as exc:
            raise FramingRejected(
                HTTPStatus.REQUEST_TIMEOUT, "read_timeout", "the body did not arrive in time"
            ) from exc
        if len(raw) != length:
            raise FramingRejected(
                HTTPStatus.BAD_REQUEST, "truncated_body", "the body is shorter than Content-Length"
            )
        return raw

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 64 * 1024))
            if not chunk:
                return
            length -= len(chunk)

    def _read_body(self, raw: bytes) -> dict[str, Any]:
        body = parse_json(raw, {})
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            raise _invalid("body must be a JSON object with a string 'inputs'")
        if not isinstance(body.get("parameters") or {}, dict):
            raise _invalid("'parameters' must be an object")
        return body

    def _authenticate(self) -> str:
        """The tenant of the caller's app key ("" for a service key, or when generation is
        open); raises Rejected UNAUTHENTICATED (no or an unknown key) or PERMISSION_DENIED (a
        key of another role)."""
        if self.credentials is None:
            return ""
        try:
            principal = self.credentials.identify(
                [("authorization", self.headers.get("Authorization"))]
            )
        except Unauthenticated as exc:
            REJECTED.labels("unauthenticated").inc()
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", str(exc)) from exc
        if principal.role not in (APP, SERVICE):
            REJECTED.labels("permission_denied").inc()
            raise Rejected(
                grpc.StatusCode.PERMISSION_DENIED,
                "permission_denied",
                f"a {principal.role} key may not generate",
            )
        return principal.name if principal.role == APP else ""

    def _unexpected(self, openai: bool) -> None:
        """A 500 for a failure that is ours, when the reply has not started (else the stream's
        own error event was the last word)."""
        log.exception("HTTP %s %s failed", self.command, self.path[:80])
        if not self._started:
            failure = Rejected(grpc.StatusCode.INTERNAL, "internal", "the server failed")
            self._refuse(failure, openai)

    # -- routes -----------------------------------------------------------------------------

    _started = False  # whether a reply's status line went out

    def send_response(self, code: int, message: str | None = None) -> None:
        self._started = True
        super().send_response(code, message)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":  # probes carry no credentials
            self._send_json(HTTPStatus.OK, {})
            return
        openai = path.startswith("/v1/")
        try:
            self._authenticate()
            if path == "/info":
                self._send_json(HTTPStatus.OK, self._info())
            elif path == openai_api.MODELS_PATH:
                self._send_json(HTTPStatus.OK, openai_api.models(*self._model()))
            elif path == f"{openai_api.MODELS_PATH}/{self.model_name}":
                self._send_json(HTTPStatus.OK, openai_api.model_card(*self._model()))
            else:
                raise openai_api.not_found("GET", path)
        except Rejected as exc:
            self._refuse(exc, openai)
        except Exception:
            self._unexpected(openai)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        openai = path.startswith("/v1/")
        try:
            raw = self._read_raw()
            tenant = self._authenticate()
            if path == openai_api.CHAT_PATH:
                self._chat(raw, tenant)
            elif path in ("/", "/generate", "/generate_stream"):
                self._tgi(path, raw, tenant)
            else:
                raise openai_api.not_found("POST", path)
        except Rejected as exc:
            if self._started:  # a stream already answered 200: its error event said why
                log.info("HTTP %s refused mid-stream: %s", path[:80], exc)
            else:
                self._refuse(exc, openai)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            log.info("HTTP client of %s went away or stalled", path[:80])
        except Exception:
            self._unexpected(openai)

    def _refuse_method(self) -> None:
        failure = FramingRejected(
            HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", "use GET or POST"
        )
        self._refuse(failure, self.path.startswith("/v1/"))

    do_PUT = do_DELETE = do_PATCH = _refuse_method

    def _tgi(self, path: str, raw: bytes, tenant: str) -> None:
        try:
            body = self._read_body(raw)
            parameters = body.get("parameters") or {}
            prepared = self.core.prepare(
                body["inputs"], [], sampling_from_tgi(parameters), tenant=tenant
            )
        except Rejected as exc:
            REJECTED.labels(exc.reason).inc()
            raise
        streaming = path == "/generate_stream" or (path == "/" and body.get("stream"))
        if streaming:
            self._stream(prepared, parameters)
            return
        outcome = self.core.run(prepared)
        reply = self._response(outcome, prepared.sampling.seed, parameters, body["inputs"])
        headers = {"x-generation-id": outcome.generation_id}
        self._send_json(HTTPStatus.OK, [reply] if path == "/" else reply, headers)

    # -- OpenAI chat completions ------------------------------------------------------------

    def _model(self) -> tuple[str, int]:
        return self.model_name, int(self.core.backend.policy().loaded_at)

    def _chat(self, raw: bytes, tenant: str) -> None:
        config = self.core.config
        try:
            try:
                body = parse_json(raw, None)
            except Rejected as exc:
                raise openai_api.ChatRejected(str(exc), None) from exc
            choices = min(MAX_CHOICES, config.max_batch)
            request = openai_api.parse_chat(body, config.max_new_tokens_limit, choices)
            # One prepare per choice: each is its own generation (own seed, own id), validated
            # and routed exactly as a gRPC or TGI request is.
            prepared = [
                self.core.prepare("", request.messages, p, tenant=tenant, user_key=request.user)
                for p in request.sampling
            ]
        except Rejected as exc:
            REJECTED.labels(exc.reason).inc()
            raise
        tokens = openai_api.TokenText(self._decode_one) if request.logprobs else None
        if request.stream:
            self._chat_stream(request, prepared, tokens)
            return
        outcomes = self._run_together(prepared)
        reply = openai_api.completion(outcomes, self.model_name, int(time.time()), tokens)
        headers = {
            "x-generation-id": outcomes[0].generation_id,
            "x-policy-version": str(outcomes[0].policy_version),
        }
        self._send_json(HTTPStatus.OK, reply, headers)

    def _decode_one(self, token: int) -> str:
        return self.core.tokenizer.decode([token])

    def _run_together(self, prepared: list[Prepared]) -> list[Outcome]:
        """Run every choice at once so they land in one batch; the first refusal fails all."""
        if len(prepared) == 1:
            return [self.core.run(prepared[0])]
        with ThreadPoolExecutor(len(prepared), thread_name_prefix="chat-choice") as pool:
            return list(pool.map(self.core.run, prepared))

    def _merged(self, prepared: list[Prepared]) -> Iterator[tuple[int, Any]]:
        """(choice index, stream item) from every choice's `core.stream`, as they come."""
        if len(prepared) == 1:
            for item in self.core.stream(prepared[0]):
                yield 0, item
            return
        items: queue.Queue[tuple[int, Any]] = queue.Queue()
        done = object()

        def drain(index: int, one: Prepared) -> None:
            try:
                for item in self.core.stream(one):
                    items.put((index, item))
            except Exception as exc:  # re-raised in the handler's thread below
                items.put((index, exc))
            items.put((index, done))

        for index, one in enumerate(prepared):
            threading.Thread(target=drain, args=(index, one), daemon=True).start()
        running = len(prepared)
        while running:
            index, item = items.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item

    def _chat_stream(
        self,
        request: openai_api.ChatRequest,
        prepared: list[Prepared],
        tokens: openai_api.TokenText | None,
    ) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chunks = openai_api.ChunkStream(self.model_name, int(time.time()))
        holds = [openai_api.StopHoldback(request.stops) for _ in prepared]
        finished: list[Outcome] = []
        opening = [chunks.delta(i, {"role": "assistant", "content": ""}) for i in range(len(holds))]
        try:
            self._sse(chunks.chunk(opening))
            for index, item in self._merged(prepared):
                if isinstance(item, Outcome):
                    rest = holds[index].finish(item.text)
                    if rest:
                        self._sse(chunks.chunk([chunks.delta(index, {"content": rest})]))
                    version = openai_api.fingerprint(item.policy_version)
                    self._sse(chunks.chunk([chunks.final(index, item)], version))
                    finished.append(item)
                    continue
                token, text, logprob = item
                content = holds[index].push(text)
                entries = [tokens.entry(token, logprob)] if tokens is not None else None
                if content or entries:
                    self._sse(chunks.chunk([chunks.delta(index, {"content": content}, entries)]))
            if request.include_usage:
                spent = sum(len(o.token_ids) for o in finished)
                counts = openai_api.usage(finished[0].prompt_tokens, spent)
                self._sse(chunks.chunk([], usage=counts))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except Rejected as exc:
            self._sse(openai_api.error_body(exc)[1])
        except (BrokenPipeError, ConnectionResetError):
            log.info("chat stream reader went away")

    def _sse(self, payload: Any) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    # -- payloads ---------------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        config = self.core.config
        state = self.core.backend.policy()
        return {
            "model_id": self.model_name,
            "model_dtype": str(serving_dtype(config.decode_dtype)).removeprefix("torch."),
            "model_device_type": "cpu",
            "max_input_tokens": config.max_prompt_tokens,
            "max_input_length": config.max_prompt_tokens,
            "max_total_tokens": config.max_prompt_tokens + config.max_new_tokens_limit,
            "max_concurrent_requests": config.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": 4,
            "router": "rlhf-platform",
            "version": "0.1.0",
            "policy_version": state.version,
            "backend": self.core.backend.name,
        }

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.core.tokenizer.decode([token])
        special = token in self.core.tokenizer.all_special_ids
        return {"id": token, "text": text, "logprob": logprob, "special": special}

    def _response(
        self, outcome: Outcome, seed: int | None, parameters: dict[str, Any], inputs: str
    ) -> dict[str, Any]:
        text = inputs + outcome.text if parameters.get("return_full_text") else outcome.text
        tokens = [
            self._token(t, lp) for t, lp in zip(outcome.token_ids, outcome.logprobs, strict=True)
        ]
        return {
            "generated_text": text,
            "details": {
                "finish_reason": FINISH_REASONS[outcome.finish_reason],
                "generated_tokens": len(outcome.token_ids),
                "seed": seed,
                "prefill": [],
                "tokens": tokens,
                "best_of_sequences": None,
            },
            "generation_id": outcome.generation_id,
            "policy_version": outcome.policy_version,
        }

    def _stream(self, prepared: Any, parameters: dict[str, Any]) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        last_token: dict[str, Any] | None = None
        try:
            for item in self.core.stream(prepared):
                if isinstance(item, Outcome):
                    final = {
                        "token": last_token,
                        "generated_text": item.text,
                        "details": {
                            "finish_reason": FINISH_REASONS[item.finish_reason],
                            "generated_tokens": len(item.token_ids),
                            "seed": prepared.sampling.seed,
                        },
                        "generation_id": item.generation_id,
                        "policy_version": item.policy_version,
                    }
                    self._event(final)
                    return
                if last_token is not None:
                    self._event({"token": last_token, "generated_text": None, "details": None})
                token, _text, logprob = item
                last_token = self._token(token, logprob)
        except Rejected as exc:
            _status, error_type = HTTP_ERRORS.get(exc.code, (500, "generation"))
            self._event({"error": str(exc), "error_type": error_type})
        except (BrokenPipeError, ConnectionResetError):
            log.info("stream reader went away")

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data:" + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


class GenerationHttpServer:
    """The HTTP API on its own thread; `port` is the bound port. With `credentials`, every
    route but `/health` needs `Authorization: Bearer <key>` of an app or a service."""

    def __init__(
        self,
        core: GenerationCore,
        model_name: str,
        host: str,
        port: int,
        credentials: Credentials | None,
        tls: TlsIdentity | None = None,
        max_connections: int = 64,
        read_timeout: float = 10.0,
    ) -> None:
        attributes = {
            "core": core,
            "model_name": model_name,
            "credentials": credentials,
            "timeout": read_timeout,
        }
        handler = type("BoundGenerationHandler", (GenerationHandler,), attributes)
        context = tls.ssl_context() if tls is not None else None
        self._httpd = BoundedHttpServer(
            (host, port), handler, context, max_connections, read_timeout
        )
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="generation-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, then wait for requests in flight."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
