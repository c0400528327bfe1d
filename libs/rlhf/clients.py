"""Thin gRPC clients the services use to call each other."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from rlhf import decoding
from rlhf.auth import ClientSecurity, dial
from rlhf.v1 import common_pb2, generation_pb2, generation_pb2_grpc, reward_pb2, reward_pb2_grpc


@dataclass(frozen=True)
class Scores:
    """Rewards of a batch of (prompt, response) pairs, and the reward model version that gave
    them (the oldest, if a hot swap landed mid-batch; 0: the untrained head or unknown)."""

    values: list[float]
    model_version: int = 0


class RewardUnavailable(Exception):
    """The reward service could not score a batch (down, overloaded, or refused it)."""


class RewardClient:
    """Scores (prompt, response) pairs through the reward service, in chunks it accepts."""

    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        chunk: int = 32,
        min_model_version: int = 0,
        stale_wait: float = 30.0,
        security: ClientSecurity = ClientSecurity(),
    ) -> None:
        """`min_model_version`: scores from an older reward model are not returned: the pairs
        are scored again (a hot swap may be under way) for up to `stale_wait` seconds, then
        RewardUnavailable (the caller retries the batch later). `security`: the service key
        Score needs, and TLS."""
        self._channel = dial(address, security)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        self._timeout = timeout
        self._chunk = chunk
        self.min_model_version = min_model_version
        self._stale_wait = stale_wait

    def model_version(self) -> int:
        """The reward model version the service serves now (0: the untrained head)."""
        try:
            reply = self._stub.GetModelInfo(reward_pb2.GetModelInfoRequest(), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise RewardUnavailable(f"{exc.code().name}: {exc.details()}") from exc
        return reply.version

    def __call__(self, prompts: list[str], responses: list[str]) -> Scores:
        """Scores of (prompt, response) pairs and the oldest reward model version that scored
        them (a hot swap can land between two chunks), at least `min_model_version`."""
        deadline = time.monotonic() + self._stale_wait
        while True:
            scored = self._score(prompts, responses)
            if scored.model_version >= self.min_model_version:
                return scored
            if time.monotonic() >= deadline:
                raise RewardUnavailable(
                    f"the reward service serves reward model v{scored.model_version}; scores "
                    f"of v{self.min_model_version} or newer are needed"
                )
            time.sleep(1.0)

    def _score(self, prompts: list[str], responses: list[str]) -> Scores:
        scores: list[float] = []
        versions: list[int] = []
        for start in range(0, len(prompts), self._chunk):
            pairs = [
                reward_pb2.ScoredPair(prompt=p, response=r)
                for p, r in zip(
                    prompts[start : start + self._chunk],
                    responses[start : start + self._chunk],
                    strict=True,
                )
            ]
            try:
                reply = self._stub.Score(
                    reward_pb2.ScoreRequest(pairs=pairs), timeout=self._timeout
                )
            except grpc.RpcError as exc:
                raise RewardUnavailable(f"{exc.code().name}: {exc.details()}") from exc
            scores.extend(reply.scores)
            versions.append(reply.model_version)
        return Scores(scores, min(versions, default=0))

    def close(self) -> None:
        self._channel.close()


# Codes that say "not now" (retry later) rather than "never" (this request is wrong).
# CANCELLED is one when this client did not cancel: an overloaded gRPC server drops calls it
# queued but never read with it, and the platform's servers cancel a call whose request did
# not arrive in time; either way nothing was done.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


class RolloutsUnavailable(RewardUnavailable):
    """The generation pool could not give rollouts for a batch now (down, overloaded, or only
    serving policy versions older than the staleness bound allows).

    A subclass of `RewardUnavailable` on purpose: for the training loop both mean "this batch's
    inputs cannot be had right now", and its handling (put the batch back, wait, retry) is the
    right one for both, where a generic failure would drop the batch's feedback.
    """


class RolloutRejected(Exception):
    """The generation pool refused a rollout request as wrong (INVALID_ARGUMENT,
    FAILED_PRECONDITION, ...) or answered it malformed: retrying would fail the same way."""


@dataclass(frozen=True)
class PoolCompletion:
    """One rollout from the pool: the sampled tokens, their logprobs under the sampling
    distribution, why it ended, and the policy version that sampled it."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int


class GenerationClient:
    """Trainer rollouts on the generation service pool (`GenerateRequest.rollout`).

    Requests carry the exact prompt token ids and come back with the sampled ids, their
    logprobs and the policy version; they publish no generation event. `rollouts` sends a
    whole batch at once (gRPC futures, no threads), so the server's batcher decodes them
    together.
    """

    def __init__(
        self, address: str, timeout: float = 120.0, security: ClientSecurity = ClientSecurity()
    ) -> None:
        """`security`: the service key rollouts need, and TLS."""
        self.address = address
        self._channel = dial(address, security)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._timeout = timeout

    def rollouts(
        self, prompts: Sequence[Sequence[int]], params: Sequence[decoding.Sampling]
    ) -> list[PoolCompletion]:
        """Sample one completion per prompt; raises RolloutsUnavailable (retry later) or
        RolloutRejected (do not)."""
        if len(prompts) != len(params):
            raise ValueError("need one Sampling per prompt")
        futures = [
            self._stub.Generate.future(self._request(prompt, p), timeout=self._timeout)
            for prompt, p in zip(prompts, params, strict=True)
        ]
        completions = []
        try:
            for future, p in zip(futures, params, strict=True):
                completions.append(self._completion(future.result(), p))
        except grpc.RpcError as exc:
            # Only now does this client cancel anything, so a CANCELLED caught above was not its
            # doing (see _TRANSIENT).
            for future in futures:
                future.cancel()
            code = exc.code()
            message = f"generation pool {self.address}: {code.name}: {exc.details()}"
            if code in _TRANSIENT:
                raise RolloutsUnavailable(message) from exc
            raise RolloutRejected(message) from exc
        return completions

    def policy_version(self) -> int:
        """The version the pool (the replica this channel reaches) serves now."""
        try:
            info = self._stub.GetPolicyInfo(
                generation_pb2.GetPolicyInfoRequest(), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise RolloutsUnavailable(f"{exc.code().name}: {exc.details()}") from exc
        return info.version

    @staticmethod
    def _request(
        prompt: Sequence[int], params: decoding.Sampling
    ) -> generation_pb2.GenerateRequest:
        sampling = common_pb2.SamplingParams(
            max_new_tokens=params.max_new_tokens, temperature=params.temperature
        )
        if params.seed is not None:
            sampling.seed = params.seed
        return generation_pb2.GenerateRequest(
            prompt_token_ids=list(prompt), sampling=sampling, return_logprobs=True, rollout=True
        )

    @staticmethod
    def _completion(
        reply: generation_pb2.GenerateResponse, params: decoding.Sampling
    ) -> PoolCompletion:
        # The update trusts these lists position by position: check them before using them.
        if len(reply.token_ids) != len(reply.logprobs) or not (
            0 < len(reply.token_ids) <= params.max_new_tokens
        ):
            raise RolloutRejected(
                f"malformed rollout: {len(reply.token_ids)} tokens, {len(reply.logprobs)} "
                f"logprobs for max_new_tokens={params.max_new_tokens}"
            )
        return PoolCompletion(
            list(reply.token_ids),
            list(reply.logprobs),
            reply.finish_reason,
            reply.policy_version,
        )

    def close(self) -> None:
        self._channel.close()
