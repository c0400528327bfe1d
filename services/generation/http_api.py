"""A text-generation-inference compatible HTTP API over GenerationCore.

Routes: POST `/` (TGI's client posts here; `"stream": true` answers with server-sent events),
POST `/generate`, POST `/generate_stream`, GET `/info`, GET `/health`, so apps written against
TGI (including the official `text-generation` client) work unchanged. Replies also carry the
signed `generation_id` and `policy_version` (extra fields TGI clients ignore) and the
`x-generation-id` header, to attach feedback.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from rlhf import decoding
from rlhf.server import Rejected
from rlhf.v1 import common_pb2

from .core import REJECTED, GenerationCore, Outcome

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


class TgiHandler(BaseHTTPRequestHandler):
    core: GenerationCore  # set on the subclass made by TgiHttpServer
    model_name: str
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
        status, error_type = HTTP_ERRORS.get(
            exc.code, (HTTPStatus.INTERNAL_SERVER_ERROR, "generation")
        )
        self._send_json(status, {"error": str(exc), "error_type": error_type})

    def _read_body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise _invalid(f"request body exceeds {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as exc:
            raise _invalid(f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            raise _invalid("body must be a JSON object with a string 'inputs'")
        if not isinstance(body.get("parameters") or {}, dict):
            raise _invalid("'parameters' must be an object")
        return body

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send_json(HTTPStatus.OK, {})
        elif self.path == "/info":
            self._send_json(HTTPStatus.OK, self._info())
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found", "error_type": "not_found"})

    def do_POST(self) -> None:
        if self.path not in ("/", "/generate", "/generate_stream"):
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found", "error_type": "not_found"})
            return
        try:
            body = self._read_body()
            parameters = body.get("parameters") or {}
            prepared = self.core.prepare(body["inputs"], [], sampling_from_tgi(parameters))
        except Rejected as exc:
            REJECTED.labels(exc.reason).inc()
            self._send_error(exc)
            return
        streaming = self.path == "/generate_stream" or (self.path == "/" and body.get("stream"))
        if streaming:
            self._stream(prepared, parameters)
            return
        try:
            outcome = self.core.run(prepared)
        except Rejected as exc:
            self._send_error(exc)
            return
        reply = self._response(outcome, prepared.sampling.seed, parameters, body["inputs"])
        headers = {"x-generation-id": outcome.generation_id}
        self._send_json(HTTPStatus.OK, [reply] if self.path == "/" else reply, headers)

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


class TgiHttpServer:
    """The HTTP API on its own thread; `port` is the bound port."""

    def __init__(self, core: GenerationCore, model_name: str, host: str, port: int) -> None:
        handler = type("BoundTgiHandler", (TgiHandler,), {"core": core, "model_name": model_name})
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
