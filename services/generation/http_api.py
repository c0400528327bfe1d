"""The generation service's HTTP API over GenerationCore: text-generation-inference routes and
OpenAI chat completions.

TGI routes: POST `/` (TGI's client posts here; `"stream": true` answers with server-sent
events), POST `/generate`, POST `/generate_stream`, GET `/info`, GET `/health`, so apps written
against TGI (including the official `text-generation` client) work unchanged. OpenAI routes:
POST `/v1/chat/completions`, GET `/v1/models` (see `openai_api.py`). Replies also carry the
signed `generation_id` and `policy_version` (extra fields clients ignore) and the
`x-generation-id` header, to attach feedback. With RLHF_GENERATION_API_KEYS set, every route
but `/health` needs `Authorization: Bearer <key>` (the feedback service's key format).
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from rlhf import decoding
from rlhf.auth import ApiKeys, Unauthenticated
from rlhf.server import Rejected
from rlhf.v1 import common_pb2

from . import openai_api
from .config import MAX_CHOICES
from .core import REJECTED, GenerationCore, Outcome, Prepared

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
FINISH_REASONS = {
    decoding.EOS: "eos_token",
    decoding.STOP: "stop_sequence",
    decoding.LENGTH: "length",
}
# Status code and TGI error_type for each refusal, as TGI's client expects them.
HTTP_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (HTTPStatus.UNPROCESSABLE_ENTITY, "validation"),
    grpc.StatusCode.UNAUTHENTICATED: (HTTPStatus.UNAUTHORIZED, "authentication"),
    grpc.StatusCode.NOT_FOUND: (HTTPStatus.NOT_FOUND, "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (HTTPStatus.TOO_MANY_REQUESTS, "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (HTTPStatus.SERVICE_UNAVAILABLE, "generation"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (HTTPStatus.GATEWAY_TIMEOUT, "generation"),
}
# TGI parameters this server does not implement; refused rather than silently ignored.
UNSUPPORTED = ("repetition_penalty", "frequency_penalty", "typical_p", "grammar", "top_n_tokens")


def _invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", message)


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
    api_keys: ApiKeys | None
    server_version = "rlhf-generation"

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
        self._send_json(status, {"error": str(exc), "error_type": error_type})

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
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as exc:
            raise _invalid("Content-Length is not a number") from exc
        if not 0 <= length <= MAX_BODY_BYTES:
            raise _invalid(f"request body exceeds {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def _read_body(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise _invalid(f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            raise _invalid("body must be a JSON object with a string 'inputs'")
        if not isinstance(body.get("parameters") or {}, dict):
            raise _invalid("'parameters' must be an object")
        return body

    def _authenticate(self) -> None:
        """Raises Rejected(UNAUTHENTICATED) when keys are configured and none of them came."""
        if self.api_keys is None:
            return
        try:
            self.api_keys.tenant_for([("authorization", self.headers.get("Authorization"))])
        except Unauthenticated as exc:
            REJECTED.labels("unauthenticated").inc()
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", str(exc)) from exc

    # -- routes -----------------------------------------------------------------------------

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

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        openai = path.startswith("/v1/")
        try:
            raw = self._read_raw()
            self._authenticate()
            if path == openai_api.CHAT_PATH:
                self._chat(raw)
            elif path in ("/", "/generate", "/generate_stream"):
                self._tgi(path, raw)
            else:
                raise openai_api.not_found("POST", path)
        except Rejected as exc:
            self._refuse(exc, openai)

    def _tgi(self, path: str, raw: bytes) -> None:
        try:
            body = self._read_body(raw)
            parameters = body.get("parameters") or {}
            prepared = self.core.prepare(body["inputs"], [], sampling_from_tgi(parameters))
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

    def _chat(self, raw: bytes) -> None:
        config = self.core.config
        try:
            try:
                body = json.loads(raw or b"null")
            except ValueError as exc:
                raise openai_api.ChatRejected(f"body is not JSON: {exc}", None) from exc
            choices = min(MAX_CHOICES, config.max_batch)
            request = openai_api.parse_chat(body, config.max_new_tokens_limit, choices)
            # One prepare per choice: each is its own generation (own seed, own id), validated
            # and routed exactly as a gRPC or TGI request is.
            prepared = [self.core.prepare("", request.messages, p) for p in request.sampling]
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
            "model_dtype": "float32",
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
    """The HTTP API on its own thread; `port` is the bound port. With `api_keys`, every route
    but `/health` needs `Authorization: Bearer <key>`."""

    def __init__(
        self,
        core: GenerationCore,
        model_name: str,
        host: str,
        port: int,
        api_keys: ApiKeys | None = None,
    ) -> None:
        attributes = {"core": core, "model_name": model_name, "api_keys": api_keys}
        handler = type("BoundGenerationHandler", (GenerationHandler,), attributes)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="tgi-http")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
