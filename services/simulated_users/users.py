"""Simulated users: ask a question, read the answer, rate it like a person who likes positivity.

The rating rule is VADER's compound sentiment (a rule-based model built from human ratings):
thumbs-up when the answer reads clearly positive, and thumbs-down for an answer that repeats
itself, as people do (`repetitive`): so sentiment cannot be bought with babble ("great great
great"), or that does not talk about what they asked (`on_topic`: no word of the question's
topic): so it cannot be bought with one cheerful answer to everything either ("I'm happy to help
with a task." to "Describe a cancelled train.", which a make up run's policy learnt at 12 nats
of KL when users rated sentiment alone). The prompts ask about everyday annoyances (traffic jams,
doing taxes, ...), so the untrained policy is mostly rated down (about 31% up; 15% of its answers
miss the topic) and there is room for training to improve it. Users ask about `TRAIN_TOPICS`;
`HELDOUT_TOPICS` are never asked by them, so a policy's thumbs-up rate there (`bench loop`)
measures what it learnt, not what it memorised.

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
# What an answer about each topic mentions: a word starting with one of these (lower case). Over
# 168 answers of the base policy to every topic's questions, the 15% without one were about
# something else ("Tell me about moving house." -> "I'm more than just a helpful AI, ...").
TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "traffic jams": ("traffic", "jam", "congest", "gridlock"),
    "rainy Mondays": ("rain", "monday"),
    "doing taxes": ("tax",),
    "waiting in long queues": ("queue", "line", "wait"),
    "a delayed flight": ("flight", "delay", "plane", "airport", "airline"),
    "a broken phone": ("phone", "smartphone", "screen"),
    "noisy neighbours": ("neighbo", "nois"),
    "cold coffee": ("coffee",),
    "a dentist visit": ("dentist", "dental", "teeth", "tooth"),
    "homework": ("homework", "assignment"),
    "losing your keys": ("key",),
    "a power cut": ("power", "electric", "outage", "blackout"),
    "slow internet": ("internet", "connection", "wifi", "wi-fi", "online"),
    "a parking ticket": ("parking", "ticket", "fine"),
    "job interviews": ("interview",),
    "a flat tyre": ("tyre", "tire", "flat"),
    "moving house": ("moving", "move", "house", "home"),
    "an empty fridge": ("fridge", "refrigerator"),
    "a long commute": ("commut",),
    "laundry day": ("laundry", "wash", "clothes"),
    "a cancelled train": ("train", "cancel", "rail"),
    "a leaking roof": ("roof", "leak"),
    "a crowded bus": ("bus", "crowd"),
    "filling in forms": ("form", "paperwork"),
    "a cold shower": ("shower",),
    "a missed alarm": ("alarm",),
    "a lost umbrella": ("umbrella",),
    "paying bills": ("bill", "pay"),
}


def prompts(topics: tuple[str, ...]) -> list[str]:
    return [template.format(topic) for topic in topics for template in TEMPLATES]


PROMPTS = tuple(prompts(TRAIN_TOPICS))  # what the simulated users ask
HELDOUT_PROMPTS = tuple(prompts(HELDOUT_TOPICS))  # never asked by them: for evaluation only
_QUESTION_TOPIC = {
    template.format(topic): topic
    for topic in TRAIN_TOPICS + HELDOUT_TOPICS
    for template in TEMPLATES
}


def topic_words(question: str) -> tuple[str, ...]:
    """The words an answer to `question` should mention; () for a question about no known topic
    (nothing to check)."""
    topic = _QUESTION_TOPIC.get(question)
    return TOPIC_WORDS[topic] if topic is not None else ()


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


def on_topic(text: str, words: tuple[str, ...]) -> bool:
    """Whether the answer mentions the topic: a word of it starts with one of `words` (always,
    with no words to look for)."""
    if not words:
        return True
    said = (w.strip(".,!?;:'\"()-").lower() for w in text.split())
    return any(w.startswith(words) for w in said)


def rate(text: str, threshold: float, topic: tuple[str, ...] = ()) -> int:
    """The simulated user's thumb for an answer; `topic`: the words an answer to the question
    should mention (`topic_words`), () not to check."""
    if repetitive(text) or not on_topic(text, topic) or sentiment(text) < threshold:
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

    def summary(self, latest: int = 6) -> str:
        """The rate of each of the `latest` versions rated last, and the earlier ones pooled
        (a long run serves dozens of versions: one log line must stay readable)."""
        with self._lock:
            versions = sorted(self.total)
            if not versions:
                return "no feedback yet"
            old, recent = versions[:-latest], versions[-latest:]
            parts = [f"v{v}: {self.up[v] / self.total[v]:.0%} of {self.total[v]}" for v in recent]
            if old:
                up, total = sum(self.up[v] for v in old), sum(self.total[v] for v in old)
                parts.insert(0, f"v{old[0]}-v{old[-1]}: {up / total:.0%} of {total}")
            return ", ".join(parts)


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
        require_topic: bool = True,
    ) -> None:
        """`rank_share`: how often the user asks for a second answer and ranks the two;
        `require_topic`: thumbs-down for an answer that does not mention the topic of a question
        about one (`topic_words`)."""
        self._generate = generation_pb2_grpc.GenerationServiceStub(generation)
        self._feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback)
        self._auth = (("authorization", f"Bearer {api_key}"),)
        self._threshold = threshold
        self._max_new_tokens = max_new_tokens
        self._rng = rng
        self._rank_share = rank_share
        self._questions = questions
        self._require_topic = require_topic
        self.tally = tally

    def interact(self, timeout: float = 120.0) -> tuple[generation_pb2.GenerateResponse, int]:
        """One round: ask, read, rate (and now and then ask again and rank the two answers).
        Returns the first answer and the thumb it got."""
        question = self._rng.choice(self._questions)
        answers = [self._ask(question, timeout)]
        if self._rng.random() < self._rank_share:
            answers.append(self._ask(question, timeout))
        topic = self.topic(question)
        thumbs = [self._rate(answer, topic, timeout) for answer in answers]
        if len(answers) == 2:
            self._rank(answers, topic, timeout)
        return answers[0], thumbs[0]

    def topic(self, question: str) -> tuple[str, ...]:
        """The words this user looks for in an answer to `question` (() if none)."""
        return topic_words(question) if self._require_topic else ()

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

    def _rate(
        self, answer: generation_pb2.GenerateResponse, topic: tuple[str, ...], timeout: float
    ) -> int:
        thumb = rate(answer.text, self._threshold, topic)
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

    def _rank(
        self,
        answers: list[generation_pb2.GenerateResponse],
        topic: tuple[str, ...],
        timeout: float,
    ) -> None:
        """Which of two answers to one question is better, unless they read about the same
        (or the user cannot tell: both repeat themselves or miss the topic)."""

        def appeal(answer: generation_pb2.GenerateResponse) -> float:
            text = answer.text
            return -2.0 if repetitive(text) or not on_topic(text, topic) else sentiment(text)

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
