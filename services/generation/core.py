"""What a generation request does, whatever the protocol: validate at the edge, generate on the
backend, sign the generation id, publish the generation event. gRPC and the TGI-compatible HTTP
API are thin adapters over this."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram
from transformers import PreTrainedTokenizerBase

from rlhf import bus, decoding
from rlhf.backends import Backend, Generated
from rlhf.batching import Overloaded, ShuttingDown
from rlhf.bus import BusUnavailable, Publisher
from rlhf.ids import GenerationIdSigner, partition_key, prompt_digest
from rlhf.limits import MAX_MESSAGES, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_USER_KEY
from rlhf.models import CHAT_ROLES, chat_text, encode_text
from rlhf.server import Rejected
from rlhf.v1 import common_pb2, events_pb2

from .config import GenerationConfig

REQUEST_SECONDS = Histogram(
    "rlhf_generation_request_seconds",
    "whole request: queue, decode, publish",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
REJECTED = Counter("rlhf_generation_rejected_total", "requests refused", ["reason"])
ROLLOUTS = Counter(
    "rlhf_generation_rollouts_total",
    "trainer rollout requests served (no generation event, no generation id)",
)

ROLES = CHAT_ROLES


def _invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", message)


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the backend."""

    prompt: str
    prompt_ids: list[int]
    sampling: decoding.Sampling
    stops: list[str]
    messages: list[common_pb2.ChatMessage]
    params: common_pb2.SamplingParams
    # A trainer's PPO rollout: neither signed nor published (see generation.proto).
    rollout: bool = False
    # The app that asked (its key's tenant), bound into the generation id; "" without one.
    tenant: str = ""
    # Who asks, within the tenant (GenerateRequest.user_key): a canary routes by it.
    user_key: str = ""

    @property
    def route_key(self) -> str | None:
        """The key a canary routes by: the tenant's user, or None (routed on its own)."""
        return f"{self.tenant}\x00{self.user_key}" if self.user_key else None


@dataclass(frozen=True)
class Outcome:
    generation_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    prompt_tokens: int


class GenerationCore:
    def __init__(
        self,
        config: GenerationConfig,
        backend: Backend,
        tokenizer: PreTrainedTokenizerBase,
        publisher: Publisher,
        signer: GenerationIdSigner,
    ) -> None:
        self.config = config
        self.backend = backend
        self.tokenizer = tokenizer
        self._publisher = publisher
        self._signer = signer

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- validation -------------------------------------------------------------------------

    def prepare(
        self,
        prompt: str,
        messages: list[common_pb2.ChatMessage],
        params: common_pb2.SamplingParams,
        prompt_token_ids: Sequence[int] = (),
        rollout: bool = False,
        tenant: str = "",
        user_key: str = "",
    ) -> Prepared:
        """Validate everything about a request; raises Rejected (INVALID_ARGUMENT, or
        FAILED_PRECONDITION for what this backend cannot do).

        `prompt_token_ids` replace prompt and messages and are decoded exactly as given: a
        trainer's rollout must continue the very ids it will score, and decoding then
        re-tokenising text does not always give them back. `rollout` marks a trainer's PPO
        rollout (see `run`); `tenant` is the app that asked, bound into the generation id so
        that only it may rate the answer; `user_key` who asks, within the tenant (a canary
        answers one user with one policy version)."""
        if len(user_key) > MAX_USER_KEY or (user_key and not user_key.isprintable()):
            raise _invalid(f"user_key must be up to {MAX_USER_KEY} printable characters")
        if (prompt_token_ids or rollout) and self.backend.name != "local":
            # TGI takes text and reports logprobs after its own logits processors: neither the
            # exact ids nor the sampling distribution's logprobs could be promised.
            raise Rejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                "unsupported",
                f"prompt_token_ids and rollouts need the local backend, not {self.backend.name}",
            )
        with self.backend.arriving():  # a batch being collected waits for this request
            if prompt_token_ids:
                if prompt or messages:
                    raise _invalid("give prompt_token_ids or prompt / messages, not both")
                prompt_ids = self._checked_ids(prompt_token_ids)
                text = self.tokenizer.decode(prompt_ids)
                sampling = self._sampling(params)
            else:
                text = self._prompt_text(prompt, messages)
                sampling = self._sampling(params)
                prompt_ids = encode_text(self.tokenizer, text)
            if rollout:
                self._check_rollout_sampling(sampling)
        limit = self.config.max_prompt_tokens
        if len(prompt_ids) > limit:
            raise _invalid(f"prompt has {len(prompt_ids)} tokens; the limit is {limit}")
        return Prepared(
            text,
            prompt_ids,
            sampling,
            list(params.stop),
            list(messages),
            params,
            rollout,
            tenant,
            user_key,
        )

    def _checked_ids(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The ids as a list, bounded before anything is decoded: the prompt-token limit (the
        same as for text) and the vocabulary (an id past it would fail the whole batch)."""
        limit = self.config.max_prompt_tokens
        if len(prompt_token_ids) > limit:
            raise _invalid(f"prompt has {len(prompt_token_ids)} tokens; the limit is {limit}")
        vocabulary = len(self.tokenizer)
        ids = list(prompt_token_ids)
        if max(ids) >= vocabulary:
            raise _invalid(f"prompt_token_ids must be below the vocabulary size {vocabulary}")
        return ids

    @staticmethod
    def _check_rollout_sampling(sampling: decoding.Sampling) -> None:
        """A rollout's logprobs are the PPO behaviour policy: they must be those of the
        distribution actually sampled from. The decode loop reports log softmax(logits / T)
        before top-k/top-p filtering, which is that distribution only when nothing is filtered,
        and greedy decoding has no distribution at all."""
        if sampling.temperature <= 0:
            raise _invalid("a rollout needs temperature > 0 (greedy has no sampling distribution)")
        if sampling.top_k > 0 or sampling.top_p < 1.0:
            raise _invalid("a rollout samples without top_k / top_p (its logprobs must be exact)")

    def _prompt_text(self, prompt: str, messages: list[common_pb2.ChatMessage]) -> str:
        limit = self.config.max_prompt_chars
        if prompt and messages:
            raise _invalid("give either prompt or messages, not both")
        if not messages:
            if not prompt.strip():
                raise _invalid("prompt is empty")
            if len(prompt) > limit:
                raise _invalid(f"prompt exceeds {limit} characters")
            return prompt
        if len(messages) > MAX_MESSAGES:
            raise _invalid(f"at most {MAX_MESSAGES} messages")
        for message in messages:
            if message.role not in ROLES:
                raise _invalid(f"message role must be one of {ROLES}, got {message.role!r}")
        if sum(len(m.content) for m in messages) > limit:
            raise _invalid(f"messages exceed {limit} characters")
        if not any(m.content.strip() for m in messages):
            raise _invalid("messages are empty")
        return chat_text(self.tokenizer, [{"role": m.role, "content": m.content} for m in messages])

    def _sampling(self, params: common_pb2.SamplingParams) -> decoding.Sampling:
        config = self.config
        max_new = params.max_new_tokens or config.default_max_new_tokens
        if max_new > config.max_new_tokens_limit:
            raise _invalid(f"max_new_tokens must be at most {config.max_new_tokens_limit}")
        if not 0.0 <= params.temperature <= 5.0:
            raise _invalid("temperature must be in [0, 5]")
        if not 0.0 <= params.top_p <= 1.0:
            raise _invalid("top_p must be in [0, 1]")
        if params.top_k > len(self.tokenizer):
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

    # -- work ---------------------------------------------------------------------------------

    def run(
        self, prepared: Prepared, on_token: Callable[[int, float], None] | None = None
    ) -> Outcome:
        """Generate, sign and publish; raises Rejected with the right status code."""
        started = time.perf_counter()
        generated = self._generate(prepared, on_token)
        text = generated.text if generated.text is not None else self.decode(generated.token_ids)
        if generated.finish_reason == decoding.STOP:
            text = decoding.cut_at_stop(text, prepared.stops)
        # A rollout is not a user's generation: unsigned (no feedback can attach to it) and
        # unpublished, so it never reaches the trainer's intake, the raters or the drift sampler.
        generation_id = ""
        if not prepared.rollout:
            digest = prompt_digest(prepared.prompt)
            generation_id = self._signer.issue(
                generated.policy_version, prompt_hash=digest, tenant=prepared.tenant
            )
        outcome = Outcome(
            generation_id=generation_id,
            text=text,
            token_ids=generated.token_ids,
            logprobs=generated.logprobs,
            finish_reason=generated.finish_reason,
            policy_version=generated.policy_version,
            prompt_tokens=len(prepared.prompt_ids),
        )
        if prepared.rollout:
            ROLLOUTS.inc()
        else:
            self._publish(prepared, outcome)
        REQUEST_SECONDS.observe(time.perf_counter() - started)
        return outcome

    def stream(self, prepared: Prepared) -> Iterator[tuple[int, str, float] | Outcome]:
        """Yields (token id, text delta, logprob) as tokens come, then the Outcome."""
        tokens: queue.Queue = queue.Queue()
        done = object()
        result: list[Outcome | Exception] = []

        def work() -> None:
            try:
                result.append(self.run(prepared, lambda t, lp: tokens.put((t, lp))))
            except Exception as exc:  # re-raised in the reader's thread below
                result.append(exc)
            tokens.put(done)

        threading.Thread(target=work, name="generate-stream", daemon=True).start()
        text = decoding.IncrementalText(self.decode)
        while (item := tokens.get()) is not done:
            token, logprob = item
            yield token, text.push(token), logprob
        if isinstance(result[0], Exception):
            raise result[0]
        yield result[0]

    def _generate(
        self, prepared: Prepared, on_token: Callable[[int, float], None] | None
    ) -> Generated:
        stop_check = decoding.stop_sequence_check(self.decode, prepared.stops)
        try:
            future = self.backend.submit(
                prepared.prompt,
                prepared.prompt_ids,
                prepared.sampling,
                stop_check,
                prepared.stops,
                on_token,
                exact=prepared.rollout,
                route_key=prepared.route_key,
            )
            try:
                return future.result(timeout=self.config.request_timeout_seconds)
            except FutureTimeout:
                future.cancel()  # the request leaves the running batch at its next step
                raise
        except Overloaded as exc:
            REJECTED.labels("overloaded").inc()
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", str(exc)) from exc
        except ShuttingDown as exc:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "shutting_down", str(exc)) from exc
        except FutureTimeout as exc:
            REJECTED.labels("timeout").inc()
            raise Rejected(
                grpc.StatusCode.DEADLINE_EXCEEDED, "timeout", "generation took too long"
            ) from exc
        except ValueError as exc:
            raise _invalid(str(exc)) from exc

    def _publish(self, prepared: Prepared, outcome: Outcome) -> None:
        created = Timestamp()
        created.GetCurrentTime()
        event = events_pb2.GenerationEvent(
            generation_id=outcome.generation_id,
            messages=prepared.messages,
            prompt=prepared.prompt,
            response=outcome.text,
            prompt_token_ids=prepared.prompt_ids,
            response_token_ids=outcome.token_ids,
            response_logprobs=outcome.logprobs,
            policy_version=outcome.policy_version,
            sampling=prepared.params,
            finish_reason=outcome.finish_reason,
            created_at=created,
        )
        try:
            self._publisher.publish(
                bus.GENERATIONS,
                partition_key(outcome.generation_id),  # the feedback service keys the same way
                event,
                timeout=self.config.publish_timeout_seconds,
            )
        except BusUnavailable as exc:
            # Without the event, feedback on this answer could never be joined: fail the call.
            REJECTED.labels("broker_unavailable").inc()
            raise Rejected(
                grpc.StatusCode.UNAVAILABLE, "broker_unavailable", f"event store unavailable: {exc}"
            ) from exc
