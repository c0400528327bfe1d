"""RewardService: score (prompt, response) pairs with the served reward model, batched."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Histogram
from transformers import PreTrainedModel

from rlhf.batching import Overloaded, ShuttingDown
from rlhf.scoring import ScoreBatcher
from rlhf.serving import HotSwap
from rlhf.v1 import reward_pb2, reward_pb2_grpc

from .config import RewardConfig

PAIRS = Counter("rlhf_reward_pairs_scored_total", "pairs scored", ["model_version"])
SCORES = Histogram(
    "rlhf_reward_score",
    "reward scores returned",
    ["model_version"],
    buckets=(-4, -2, -1, -0.5, 0, 0.5, 1, 2, 4),
)


# Without a client deadline grpc reports an enormous time remaining; waiting that long would
# overflow the platform's timeout arithmetic, so it counts as no deadline.
_NO_DEADLINE = 24 * 3600.0


def _timeout(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE else max(remaining, 0.0)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(
        self, config: RewardConfig, batcher: ScoreBatcher, served: HotSwap[PreTrainedModel]
    ) -> None:
        self._config = config
        self._batcher = batcher
        self._served = served

    def GetModelInfo(
        self, request: reward_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> reward_pb2.ModelInfo:
        served = self._served.current()
        return reward_pb2.ModelInfo(
            version=served.version,
            manifest_sha256=served.manifest_sha256,
            loaded_at=served.loaded_at,
            model=self._config.reward_model,
        )

    def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        with self._batcher.arriving() as arrival:  # a batch being collected waits for this
            problem = self._check(request)
            if problem:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            pairs = [(p.prompt, p.response) for p in request.pairs]
            try:
                scores, version = self._batcher.submit(pairs, _timeout(context), arrival)
            except Overloaded as exc:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except ShuttingDown as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except TimeoutError:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "scoring did not finish in time")
        label = str(version)
        PAIRS.labels(label).inc(len(scores))
        histogram = SCORES.labels(label)
        for score in scores:
            histogram.observe(score)
        return reward_pb2.ScoreResponse(scores=scores, model_version=version)

    def _check(self, request: reward_pb2.ScoreRequest) -> str | None:
        if not request.pairs:
            return "at least one pair is required"
        if len(request.pairs) > self._config.max_batch:
            return f"at most {self._config.max_batch} pairs per call"
        limit = self._config.max_text_chars
        for index, pair in enumerate(request.pairs):
            if not pair.prompt.strip():
                return f"pair {index}: prompt is empty"
            if len(pair.prompt) > limit or len(pair.response) > limit:
                return f"pair {index}: prompt and response are limited to {limit} characters"
        return None
