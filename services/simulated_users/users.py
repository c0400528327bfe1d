"""Simulated users: ask a question, read the answer, rate it like a person who likes positivity.

The rating rule is VADER's compound sentiment (a rule-based model built from human ratings):
thumbs-up when the answer reads clearly positive, and thumbs-down for an answer that repeats
itself, as people do (`repetitive`): so sentiment cannot be bought with babble ("great great
great"). The prompts ask about everyday annoyances (traffic jams, doing taxes, ...), so the
untrained policy is mostly rated down (about 35% up) and there is room for training to improve
it. Users ask about `TRAIN_TOPICS`; `HELDOUT_TOPICS` are never asked by them, so a policy's
thumbs-up rate there (`bench loop`) measures what it learnt, not what it memorised.

Now and then a user asks for a second answer and says which of the two is better, as chat apps
ask ("which response do you prefer?"): a ranking, when the two clearly differ.
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

TEMPLATES = (
    "Describe {}.",
    "What do you think about {}?",
    "Write one sentence about {}.",
    "How do you feel about {}?",
    "Tell me about {}.",
    "What is it like to deal with {}?",
)
TRAIN_TOPICS = (
    "traffic jams",
    "rainy Mondays",
    "doing taxes",
    "waiting in long queues",
    "a delayed flight",
    "a broken phone",
    "noisy neighbours",
    "cold coffee",
    "a dentist visit",
    "homework",
    "losing your keys",
    "a power cut",
    "slow internet",
    "a parking ticket",
    "job interviews",
    "a flat tyre",
    "moving house",
    "an empty fridge",
    "a long commute",
    "laundry day",
)
HELDOUT_TOPICS = (
    "a cancelled train",
    "a leaking roof",
    "a crowded bus",
    "filling in forms",
    "a cold shower",
    "a missed alarm",
    "a lost umbrella",
    "paying bills",
)


def prompts(topics: tuple[str, ...]) -> list[str]:
    return [template.format(topic) for topic in topics for template in TEMPLATES]


PROMPTS = tuple(prompts(TRAIN_TOPICS))  # what the simulated users ask
HELDOUT_PROMPTS = tuple(prompts(HELDOUT_TOPICS))  # never asked by them: for evaluation only

# A user asked which of two answers is better gives no ranking when they read about the same
# (VADER compound scores closer than this), like a "no preference" button.
INDIFFERENCE = 0.1
# Below this share of distinct word bigrams an answer reads as repeating itself. SmolLM2's own
# answers are all above 0.88 (1st percentile of 672), "great great great wonderful wonderful
# wonderful great great" is at 0.57.
MIN_DISTINCT_BIGRAMS = 0.8

_ANALYZER = SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound score in [-1, 1]."""
    return _ANALYZER.polarity_scores(text)["compound"]


def distinct_bigrams(text: str) -> float:
    """The share of distinct word bigrams (1.0 for fewer than five: nothing to repeat)."""
    words = text.lower().split()
    bigrams = list(zip(words, words[1:], strict=False))
    return len(set(bigrams)) / len(bigrams) if len(bigrams) >= 5 else 1.0


def repetitive(text: str) -> bool:
    """Whether an answer repeats itself: a long word twice in a row ("a tragic tragic ending")
    or too few distinct word bigrams."""
    words = [w.strip(".,!?;:'\"()").lower() for w in text.split()]
    stutter = any(a == b and len(a) >= 5 for a, b in zip(words, words[1:], strict=False))
    return stutter or distinct_bigrams(text) < MIN_DISTINCT_BIGRAMS


def rate(text: str, threshold: float) -> int:
    """The simulated user's thumb for an answer."""
    if repetitive(text) or sentiment(text) < threshold:
        return events_pb2.THUMB_DOWN
    return events_pb2.THUMB_UP


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
        rank_share: float = 0.0,
        questions: tuple[str, ...] = PROMPTS,
    ) -> None:
        """`rank_share`: how often the user asks for a second answer and ranks the two."""
        self._generate = generation_pb2_grpc.GenerationServiceStub(generation)
        self._feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback)
        self._auth = (("authorization", f"Bearer {api_key}"),)
        self._threshold = threshold
        self._max_new_tokens = max_new_tokens
        self._rng = rng
        self._rank_share = rank_share
        self._questions = questions
        self.tally = tally

    def interact(self, timeout: float = 120.0) -> tuple[generation_pb2.GenerateResponse, int]:
        """One round: ask, read, rate (and now and then ask again and rank the two answers).
        Returns the first answer and the thumb it got."""
        question = self._rng.choice(self._questions)
        answers = [self._ask(question, timeout)]
        if self._rng.random() < self._rank_share:
            answers.append(self._ask(question, timeout))
        thumbs = [self._rate(answer, timeout) for answer in answers]
        if len(answers) == 2:
            self._rank(answers, timeout)
        return answers[0], thumbs[0]

    def _ask(self, question: str, timeout: float) -> generation_pb2.GenerateResponse:
        return self._generate.Generate(
            generation_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content=question)],
                sampling=common_pb2.SamplingParams(
                    max_new_tokens=self._max_new_tokens, temperature=0.8
                ),
            ),
            metadata=self._auth,  # the tenant's key: its ids take feedback only from it
            timeout=timeout,
        )

    def _send(self, feedback: events_pb2.Feedback, timeout: float) -> None:
        self._feedback.SubmitFeedback(
            feedback_pb2.SubmitFeedbackRequest(feedback=feedback),
            metadata=self._auth,
            timeout=timeout,
        )

    def _rate(self, answer: generation_pb2.GenerateResponse, timeout: float) -> int:
        thumb = rate(answer.text, self._threshold)
        self._send(
            events_pb2.Feedback(
                generation_id=answer.generation_id,
                idempotency_key=uuid.uuid4().hex,
                thumb=thumb,
            ),
            timeout,
        )
        self.tally.add(answer.policy_version, thumb)
        return thumb

    def _rank(self, answers: list[generation_pb2.GenerateResponse], timeout: float) -> None:
        """Which of two answers to one question is better, unless they read about the same
        (or the user cannot tell: both repeat themselves)."""

        def appeal(answer: generation_pb2.GenerateResponse) -> float:
            return -2.0 if repetitive(answer.text) else sentiment(answer.text)

        best, worst = sorted(answers, key=appeal, reverse=True)
        if appeal(best) - appeal(worst) < INDIFFERENCE:
            return
        ranking = events_pb2.Ranking(generation_ids=[best.generation_id, worst.generation_id])
        self._send(
            events_pb2.Feedback(
                generation_id=answers[0].generation_id,
                idempotency_key=uuid.uuid4().hex,
                ranking=ranking,
            ),
            timeout,
        )
