"""Simulated users: ask a question, read the answer, rate it like a person who likes positivity.

The rating rule is VADER's compound sentiment (a rule-based model built from human ratings):
thumbs-up when the answer reads clearly positive. The prompts invite either tone, so the untrained
policy earns a mixed rate and there is room for training to improve it.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections import defaultdict

import grpc
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf.v1 import (
    common_pb2,
    events_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)

log = logging.getLogger(__name__)

PROMPTS = (
    "How was your weekend?",
    "What do you think about rainy days?",
    "Describe Mondays in one sentence.",
    "What is it like to wait in a long queue?",
    "Tell me about your favourite food.",
    "How do you feel about winter?",
    "Write one sentence about traffic.",
    "What do you think of homework?",
    "Describe the city at night.",
    "How would you describe a job interview?",
    "What is your opinion of airports?",
    "Tell me about learning a new language.",
)

_ANALYZER = SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound score in [-1, 1]."""
    return _ANALYZER.polarity_scores(text)["compound"]


def rate(text: str, threshold: float) -> int:
    """The simulated user's thumb for an answer."""
    return events_pb2.THUMB_UP if sentiment(text) >= threshold else events_pb2.THUMB_DOWN


class Tally:
    """Thumbs-up rate per policy version, for logs and the end-to-end tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.up: dict[int, int] = defaultdict(int)
        self.total: dict[int, int] = defaultdict(int)

    def add(self, version: int, thumb: int) -> None:
        with self._lock:
            self.total[version] += 1
            self.up[version] += thumb == events_pb2.THUMB_UP

    def rates(self) -> dict[int, float]:
        with self._lock:
            return {v: self.up[v] / n for v, n in sorted(self.total.items())}


class SimulatedUser:
    def __init__(
        self,
        generation: grpc.Channel,
        feedback: grpc.Channel,
        api_key: str,
        threshold: float,
        max_new_tokens: int,
        rng: random.Random,
        tally: Tally,
    ) -> None:
        self._generate = generation_pb2_grpc.GenerationServiceStub(generation)
        self._feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback)
        self._auth = (("authorization", f"Bearer {api_key}"),)
        self._threshold = threshold
        self._max_new_tokens = max_new_tokens
        self._rng = rng
        self.tally = tally

    def interact(self, timeout: float = 120.0) -> tuple[generation_pb2.GenerateResponse, int]:
        """One round: ask, read, rate. Returns the answer and the thumb given."""
        question = self._rng.choice(PROMPTS)
        answer = self._generate.Generate(
            generation_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content=question)],
                sampling=common_pb2.SamplingParams(
                    max_new_tokens=self._max_new_tokens, temperature=0.8
                ),
            ),
            metadata=self._auth,  # the tenant's key: its ids take feedback only from it
            timeout=timeout,
        )
        thumb = rate(answer.text, self._threshold)
        self._feedback.SubmitFeedback(
            feedback_pb2.SubmitFeedbackRequest(
                feedback=events_pb2.Feedback(
                    generation_id=answer.generation_id,
                    idempotency_key=uuid.uuid4().hex,
                    thumb=thumb,
                )
            ),
            metadata=self._auth,
            timeout=timeout,
        )
        self.tally.add(answer.policy_version, thumb)
        return answer, thumb
