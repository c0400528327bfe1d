"""Thin gRPC clients the services use to call each other."""

from __future__ import annotations

import grpc

from rlhf.v1 import reward_pb2, reward_pb2_grpc


class RewardUnavailable(Exception):
    """The reward service could not score a batch (down, overloaded, or refused it)."""


class RewardClient:
    """Scores (prompt, response) pairs through the reward service, in chunks it accepts."""

    def __init__(self, address: str, timeout: float = 30.0, chunk: int = 32) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        self._timeout = timeout
        self._chunk = chunk
        self.last_model_version = 0

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores: list[float] = []
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
            self.last_model_version = reply.model_version
        return scores

    def close(self) -> None:
        self._channel.close()
