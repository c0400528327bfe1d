"""GenerationService: validate at the edge, sample on the served policy, publish the event."""

from __future__ import annotations

import logging
import threading
import time

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram
from transformers import PreTrainedTokenizerBase

from rlhf import bus, decoding
from rlhf.bus import BusUnavailable, Publisher
from rlhf.ids import GenerationIdSigner
from rlhf.server import Rejected
from rlhf.serving import HotSwap
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc

from .config import GenerationConfig

log = logging.getLogger(__name__)

TOKENS = Counter("rlhf_generation_tokens_total", "tokens generated", ["policy_version"])
TIME_TO_ANSWER = Histogram(
    "rlhf_generation_seconds",
    "time to sample a whole answer",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
REJECTED = Counter("rlhf_generation_rejected_total", "requests refused", ["reason"])

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_MESSAGES = 64


def _invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", message)


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(
        self,
        config: GenerationConfig,
        policy: HotSwap,
        tokenizer: PreTrainedTokenizerBase,
        publisher: Publisher,
        signer: GenerationIdSigner,
        model_name: str,
    ) -> None:
        self._config = config
        self._policy = policy
        self._tokenizer = tokenizer
        self._publisher = publisher
        self._signer = signer
        self._model_name = model_name
        self._eos_ids = {tokenizer.eos_token_id}
        # One forward pass at a time on the CPU; the slots bound what may queue behind it.
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_requests)

    # -- validation -------------------------------------------------------------------------

    def _prompt_text(self, request: generation_pb2.GenerateRequest) -> str:
        if request.prompt and request.messages:
            raise _invalid("give either prompt or messages, not both")
        if request.messages:
            if len(request.messages) > MAX_MESSAGES:
                raise _invalid(f"at most {MAX_MESSAGES} messages")
            for message in request.messages:
                if message.role not in ROLES:
                    raise _invalid(f"message role must be one of {ROLES}, got {message.role!r}")
            total = sum(len(m.content) for m in request.messages)
            if total > self._config.max_prompt_chars:
                raise _invalid(f"messages exceed {self._config.max_prompt_chars} characters")
            if not any(m.content.strip() for m in request.messages):
                raise _invalid("messages are empty")
            chat = [{"role": m.role, "content": m.content} for m in request.messages]
            return self._tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
        if not request.prompt.strip():
            raise _invalid("prompt is empty")
        if len(request.prompt) > self._config.max_prompt_chars:
            raise _invalid(f"prompt exceeds {self._config.max_prompt_chars} characters")
        return request.prompt

    def _sampling(self, params: common_pb2.SamplingParams) -> decoding.Sampling:
        config = self._config
        max_new = params.max_new_tokens or config.default_max_new_tokens
        if max_new > config.max_new_tokens_limit:
            raise _invalid(f"max_new_tokens must be at most {config.max_new_tokens_limit}")
        if not 0.0 <= params.temperature <= 5.0:
            raise _invalid("temperature must be in [0, 5]")
        if not 0.0 <= params.top_p <= 1.0:
            raise _invalid("top_p must be in [0, 1]")
        if params.top_k > len(self._tokenizer):
            raise _invalid("top_k exceeds the vocabulary")
        if len(params.stop) > MAX_STOP_SEQUENCES or any(
            not s or len(s) > MAX_STOP_CHARS for s in params.stop
        ):
            raise _invalid(
                f"at most {MAX_STOP_SEQUENCES} non-empty stop sequences of {MAX_STOP_CHARS} chars"
            )
        return decoding.Sampling(
            max_new_tokens=max_new,
            temperature=params.temperature,
            top_p=params.top_p or 1.0,
            top_k=params.top_k,
            seed=params.seed if params.HasField("seed") else None,
        )

    # -- RPCs ---------------------------------------------------------------------------------

    def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        if not self._slots.acquire(blocking=False):
            REJECTED.labels("overloaded").inc()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests in flight")
        try:
            return self._generate(request)
        except Rejected as exc:
            REJECTED.labels(exc.reason).inc()
            context.abort(exc.code, str(exc))
        finally:
            self._slots.release()

    def GetPolicyInfo(
        self, request: generation_pb2.GetPolicyInfoRequest, context: grpc.ServicerContext
    ) -> generation_pb2.PolicyInfo:
        served = self._policy.current()
        loaded_at = Timestamp()
        loaded_at.FromNanoseconds(int(served.loaded_at * 1e9))
        return generation_pb2.PolicyInfo(
            version=served.version,
            manifest_sha256=served.manifest_sha256,
            loaded_at=loaded_at,
            model=self._model_name,
        )

    # -- work ---------------------------------------------------------------------------------

    def _generate(self, request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateResponse:
        prompt = self._prompt_text(request)
        sampling = self._sampling(request.sampling)
        prompt_ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > self._config.max_prompt_tokens:
            limit = self._config.max_prompt_tokens
            raise _invalid(f"prompt has {len(prompt_ids)} tokens; the limit is {limit}")
        stops = list(request.sampling.stop)
        served = self._policy.current()  # the version this request runs on, whatever swaps
        started = time.perf_counter()
        with self._model_lock:
            completion = decoding.generate(
                served.model,
                [prompt_ids],
                [sampling],
                self._eos_ids,
                self._tokenizer.pad_token_id,
                stop_check=self._stop_check(stops) if stops else None,
            )[0]
        TIME_TO_ANSWER.observe(time.perf_counter() - started)
        TOKENS.labels(str(served.version)).inc(len(completion.token_ids))
        text = self._tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        if completion.finish_reason == decoding.STOP:
            text = _cut_at_stop(text, stops)
        generation_id = self._signer.issue(served.version)
        self._publish_event(
            request, generation_id, prompt, prompt_ids, text, completion, served.version
        )
        return generation_pb2.GenerateResponse(
            generation_id=generation_id,
            text=text,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(completion.token_ids),
            policy_version=served.version,
            finish_reason=completion.finish_reason,
            logprobs=completion.logprobs if request.return_logprobs else [],
        )

    def _stop_check(self, stops: list[str]) -> decoding.StopCheck:
        longest = max(len(s) for s in stops)

        def check(_row: int, token_ids: list[int]) -> bool:
            # Decoding the last few tokens is enough: a token spans at least one character.
            tail = self._tokenizer.decode(token_ids[-(longest + 2) :], skip_special_tokens=True)
            return any(s in tail for s in stops)

        return check

    def _publish_event(
        self,
        request: generation_pb2.GenerateRequest,
        generation_id: str,
        prompt: str,
        prompt_ids: list[int],
        text: str,
        completion: decoding.Completion,
        version: int,
    ) -> None:
        created = Timestamp()
        created.GetCurrentTime()
        event = events_pb2.GenerationEvent(
            generation_id=generation_id,
            messages=request.messages,
            prompt=prompt,
            response=text,
            prompt_token_ids=prompt_ids,
            response_token_ids=completion.token_ids,
            response_logprobs=completion.logprobs,
            policy_version=version,
            sampling=request.sampling,
            finish_reason=completion.finish_reason,
            created_at=created,
        )
        try:
            self._publisher.publish(
                bus.GENERATIONS, generation_id, event, timeout=self._config.publish_timeout_seconds
            )
        except BusUnavailable as exc:
            # Without the event, feedback on this answer could never be joined: fail the call.
            raise Rejected(
                grpc.StatusCode.UNAVAILABLE, "broker_unavailable", f"event store unavailable: {exc}"
            ) from exc


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]
