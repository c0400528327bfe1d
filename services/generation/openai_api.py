"""OpenAI chat completions over GenerationCore: request and reply shapes, no sockets.

`POST /v1/chat/completions` and `GET /v1/models` as the official `openai` client uses them. The
handler in `http_api.py` parses a body with `parse_chat`, runs each choice through the core's
`prepare` and `run` / `stream` (the same validation, batching, canary routing and generation
events as gRPC and TGI), and renders replies with the functions here.

What the core can honestly give, and how it maps:
- `logprobs: true` reports each sampled token's log-probability as the decode loop computed it
  (under the request's temperature, before top_p; greedy requests: temperature 1), for every
  sampled token including one that completed a stop sequence. `top_logprobs` above 0 is refused:
  the decode loop keeps only the sampled token's logprob, and each entry's `top_logprobs` is `[]`.
- `n` choices are `n` requests submitted together, so they share a batch; with a `seed`, choice i
  uses seed + i (all choices identical would make `n` pointless).
- Each choice is its own generation with its own signed id: `generation_id` (and the
  `policy_version` that answered) on every choice, the first one's id as the completion `id` and
  the `x-generation-id` header. A stream learns ids only when each choice ends: its chunks share a
  `chatcmpl-` id, and each choice's final chunk carries `generation_id` and `policy_version`.
- Parameters that would change the answer and are not implemented (penalties, logit_bias, tools,
  structured output) are refused with 400, never silently ignored.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import grpc

from rlhf import decoding
from rlhf.limits import MAX_MESSAGES, MAX_STOP_SEQUENCES
from rlhf.server import Rejected
from rlhf.v1 import common_pb2

from .core import Outcome

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
# OpenAI's "developer" role is the newer name of "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {decoding.EOS: "stop", decoding.STOP: "stop", decoding.LENGTH: "length"}
# Status code, OpenAI error type and code for each refusal.
ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (HTTPStatus.BAD_REQUEST, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (HTTPStatus.BAD_REQUEST, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (
        HTTPStatus.UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        HTTPStatus.FORBIDDEN,
        "invalid_request_error",
        "permission_denied",
    ),
    grpc.StatusCode.NOT_FOUND: (HTTPStatus.NOT_FOUND, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        HTTPStatus.TOO_MANY_REQUESTS,
        "requests",
        "rate_limit_exceeded",
    ),
    grpc.StatusCode.UNAVAILABLE: (HTTPStatus.SERVICE_UNAVAILABLE, "server_error", None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (HTTPStatus.GATEWAY_TIMEOUT, "server_error", "timeout"),
}
# Parameters that change what is generated and that this server does not implement: refused
# when set to anything but their neutral value.
UNSUPPORTED = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}


class ChatRejected(Rejected):
    """A refusal that names the offending request parameter (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    messages: list[common_pb2.ChatMessage]
    sampling: list[common_pb2.SamplingParams]  # one per choice
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    requested_model: str = ""
    stops: list[str] = field(default_factory=list)
    user: str = ""  # the app's user, for a canary's sticky routing


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ChatRejected(f"{name} must be a number in [{low:g}, {high:g}]", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ChatRejected(f"{name} must be an integer in [{low}, {high}]", name)
    return value


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ChatRejected("only text content parts are supported", where)
            if not isinstance(part.get("text"), str):
                raise ChatRejected("a text content part needs a string 'text'", where)
            texts.append(part["text"])
        return "".join(texts)
    raise ChatRejected("content must be a string or a list of text parts", where)


def parse_messages(raw: Any) -> list[common_pb2.ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise ChatRejected("messages must be a non-empty list", "messages")
    if len(raw) > MAX_MESSAGES:
        raise ChatRejected(f"at most {MAX_MESSAGES} messages", "messages")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ChatRejected("each message must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise ChatRejected(
                f"{where}.role must be one of {sorted(ROLES)}, got {role!r}", f"{where}.role"
            )
        content = _content(message.get("content"), f"{where}.content")
        messages.append(common_pb2.ChatMessage(role=ROLES[role], content=content))
    return messages


def _stops(raw: Any) -> list[str]:
    if raw is None:
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ChatRejected("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ChatRejected(f"at most {MAX_STOP_SEQUENCES} stop sequences", "stop")
    return stops


def parse_chat(body: Any, max_new_tokens_limit: int, max_choices: int) -> ChatRequest:
    """A chat completions request body as the core's inputs; raises ChatRejected.

    Only what the OpenAI protocol adds is checked here (types, `n`, the token limit under its
    OpenAI name); everything else (roles, lengths, stop sequences, sampling ranges) is the core's
    `prepare`, shared with gRPC and TGI."""
    if not isinstance(body, dict):
        raise ChatRejected("the body must be a JSON object", None)
    model = body.get("model", "")
    if not isinstance(model, str):
        raise ChatRejected("model must be a string", "model")
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise ChatRejected(f"{name} is not supported by this server", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ChatRejected("only the text response_format is supported", "response_format")
    messages = parse_messages(body.get("messages"))
    limit_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_new = _integer(body, limit_name, 1, 1 << 31)
    if max_new is not None and max_new > max_new_tokens_limit:
        raise ChatRejected(f"{limit_name} must be at most {max_new_tokens_limit}", limit_name)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed", 0, (1 << 64) - 1)  # SamplingParams.seed is uint64
    n = _integer(body, "n", 1, max_choices) or 1
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise ChatRejected("logprobs must be a boolean", "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, 20)
    if top_logprobs:
        raise ChatRejected(
            "top_logprobs is not supported: this server reports the sampled token's logprob "
            "only (logprobs: true)",
            "top_logprobs",
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ChatRejected("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ChatRejected("stream_options must be an object", "stream_options")
    stops = _stops(body.get("stop"))
    user = body.get("user") or ""
    if not isinstance(user, str):
        raise ChatRejected("user must be a string", "user")
    sampling = []
    for choice in range(n):
        params = common_pb2.SamplingParams(
            max_new_tokens=max_new or 0,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            stop=stops,
        )
        if seed is not None:
            params.seed = (seed + choice) % (1 << 64)
        sampling.append(params)
    return ChatRequest(
        messages=messages,
        sampling=sampling,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        logprobs=logprobs,
        requested_model=model,
        stops=stops,
        user=user,
    )


# -- replies ----------------------------------------------------------------------------------


def error_body(exc: Rejected) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error object) for a refusal."""
    status, kind, code = ERRORS.get(
        exc.code, (HTTPStatus.INTERNAL_SERVER_ERROR, "server_error", None)
    )
    status = getattr(exc, "http_status", None) or status  # framing: 411, 413
    param = exc.param if isinstance(exc, ChatRejected) else None
    error = {"message": str(exc), "type": kind, "param": param, "code": code or exc.reason}
    return int(status), {"error": error}


def not_found(method: str, path: str) -> Rejected:
    return Rejected(grpc.StatusCode.NOT_FOUND, "unknown_url", f"no route {method} {path[:80]}")


class TokenText:
    """A token's text and UTF-8 bytes for logprobs (bytes are null when the token is part of a
    character split across tokens)."""

    def __init__(self, decode_one: Any) -> None:
        self._decode_one = decode_one

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self._decode_one(token)
        data = None if "\ufffd" in text else list(text.encode())
        return {"token": text, "bytes": data, "logprob": logprob, "top_logprobs": []}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def fingerprint(policy_version: int) -> str:
    """`system_fingerprint`: which policy answered (OpenAI's name for the backend's build)."""
    return f"rlhf-policy-v{policy_version}"


def completion(
    outcomes: Sequence[Outcome], model: str, created: int, tokens: TokenText | None
) -> dict[str, Any]:
    """A whole `chat.completion`; `tokens` set when logprobs were asked for."""
    choices = []
    for index, outcome in enumerate(outcomes):
        logprobs = None
        if tokens is not None:
            content = [
                tokens.entry(t, lp)
                for t, lp in zip(outcome.token_ids, outcome.logprobs, strict=True)
            ]
            logprobs = {"content": content, "refusal": None}
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": outcome.text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": FINISH_REASONS[outcome.finish_reason],
                "generation_id": outcome.generation_id,
                "policy_version": outcome.policy_version,
            }
        )
    first = outcomes[0]
    return {
        "id": first.generation_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint(first.policy_version),
        "choices": choices,
        "usage": usage(first.prompt_tokens, sum(len(o.token_ids) for o in outcomes)),
    }


@dataclass
class ChunkStream:
    """Renders the chunks of one streamed completion (all share one id and creation time)."""

    model: str
    created: int
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")

    def chunk(
        self, choices: list[dict[str, Any]], fingerprint_: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": fingerprint_,
            "choices": choices,
            **extra,
        }

    @staticmethod
    def delta(index: int, delta: dict[str, Any], logprobs: list | None = None) -> dict[str, Any]:
        return {
            "index": index,
            "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": None,
        }

    @staticmethod
    def final(index: int, outcome: Outcome) -> dict[str, Any]:
        return {
            "index": index,
            "delta": {},
            "logprobs": None,
            "finish_reason": FINISH_REASONS[outcome.finish_reason],
            "generation_id": outcome.generation_id,
            "policy_version": outcome.policy_version,
        }


class StopHoldback:
    """Text deltas for a stream that never show a stop sequence or anything after it.

    The decode loop stops a row once a stop sequence has appeared, so its last tokens carry (part
    of) it; a non-streamed answer is cut before it. A stream must not have sent those characters
    already: text that could still become a stop sequence is held back until it cannot."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._text = ""
        self._sent = 0

    def push(self, delta: str) -> str:
        self._text += delta
        safe = self._safe()
        out = self._text[self._sent : safe]
        self._sent = max(self._sent, safe)
        return out

    def _safe(self) -> int:
        """The first position where a stop sequence begins, or where the text so far could
        still become one: nothing before it can ever be cut."""
        for start in range(self._sent, len(self._text)):
            rest = self._text[start:]
            if any(rest.startswith(stop) or stop.startswith(rest) for stop in self._stops):
                return start
        return len(self._text)

    def finish(self, final_text: str) -> str:
        """What is left to send, given the core's final (cut) text."""
        sent = self._text[: self._sent]
        return final_text[len(sent) :] if final_text.startswith(sent) else ""


def models(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "rlhf-platform"}
