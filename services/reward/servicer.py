"""RewardService: score (prompt, response) pairs with the served reward model."""

from __future__ import annotations

import threading

import grpc
import torch
from prometheus_client import Counter, Histogram
from transformers import PreTrainedTokenizerBase

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


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(
        self, config: RewardConfig, model: HotSwap, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self._config = config
        self._model = model
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        problem = self._check(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        served = self._model.current()
        encoded = self._tokenizer(
            [p.prompt for p in request.pairs],
            [p.response for p in request.pairs],
            padding=True,
            truncation="longest_first",
            max_length=self._config.max_tokens,
            return_tensors="pt",
        )
        with self._lock, torch.inference_mode():
            scores = served.model(**encoded).logits[:, 0].tolist()
        version = str(served.version)
        PAIRS.labels(version).inc(len(scores))
        for score in scores:
            SCORES.labels(version).observe(score)
        return reward_pb2.ScoreResponse(scores=scores, model_version=served.version)

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
