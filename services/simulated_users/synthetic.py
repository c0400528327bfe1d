"""A synthetic feedback stream: templated answers to the simulated users' prompts, rated by them.

Real SmolLM2 samples are slow on a CPU and mostly neutral, so tests, benchmarks and demos of the
reward stage use answers built from templates instead: a subject taken from the prompt, an
evaluative phrase drawn from positive, negative and neutral word lists (with intensifiers,
negations and "but" clauses, so the tone is not a fixed function of the template), and an
ending. The labels are not the templates' intended tone: every answer is rated by the simulated
users' own rule (`users.rate`, VADER sentiment), so the reward model learns what the users reward.

`feedback_stream` yields generation and feedback events exactly as the generation and feedback
services would publish them: each prompt gets two answers, each answer a thumb, and the pair a
ranking (best first) when the user clearly prefers one of them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from rlhf.v1 import common_pb2, events_pb2

from .users import INDIFFERENCE, rate, sentiment

SUBJECTS = {
    "How was your weekend?": ("my weekend", "was"),
    "What do you think about rainy days?": ("rainy days", "are"),
    "Describe Mondays in one sentence.": ("Mondays", "are"),
    "What is it like to wait in a long queue?": ("waiting in a long queue", "is"),
    "Tell me about your favourite food.": ("my favourite food", "is"),
    "How do you feel about winter?": ("winter", "is"),
    "Write one sentence about traffic.": ("traffic", "is"),
    "What do you think of homework?": ("homework", "is"),
    "Describe the city at night.": ("the city at night", "is"),
    "How would you describe a job interview?": ("a job interview", "is"),
    "What is your opinion of airports?": ("airports", "are"),
    "Tell me about learning a new language.": ("learning a new language", "is"),
}

POSITIVE = (
    "wonderful", "lovely", "great", "relaxing", "delightful", "fantastic", "pleasant", "cheerful",
    "exciting", "fun", "beautiful", "amazing", "enjoyable", "peaceful", "charming", "rewarding",
)  # fmt: skip
NEGATIVE = (
    "awful", "terrible", "boring", "exhausting", "miserable", "stressful", "dreadful", "annoying",
    "gloomy", "horrible", "frustrating", "tedious", "dull", "painful", "depressing", "ugly",
)  # fmt: skip
NEUTRAL = (
    "ordinary", "long", "quiet", "busy", "normal", "short", "typical", "usual", "different",
    "common", "predictable", "brief",
)  # fmt: skip
INTENSIFIERS = ("", "", "really ", "very ", "quite ", "somewhat ", "extremely ", "a bit ")
OPENERS = ("", "", "Honestly, ", "Well, ", "I think ", "To be fair, ", "In my view, ")
ENDINGS = {
    "positive": ("!", ", and I love it.", ", and it makes me smile.", ", what a joy."),
    "negative": (".", ", and I hate it.", ", which makes me sad.", ", what a pain."),
    "neutral": (".", ", as always.", ", I suppose.", ", nothing more.", " most of the time."),
}
WORDS = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
TONES = ("positive", "positive", "negative", "negative", "neutral")
PROMPTS = tuple(SUBJECTS)  # the questions of this synthetic stream
MIXED = 0.2  # share of answers with a "but" clause in a second, random tone
NEGATED = 0.1  # share of evaluative phrases negated ("not great")


def _phrase(tone: str, rng: random.Random) -> str:
    """An evaluative phrase in `tone`: an adjective, intensified or (sometimes) negated."""
    adjective = rng.choice(WORDS[tone])
    if rng.random() < NEGATED:
        return f"not {adjective}"
    return f"{rng.choice(INTENSIFIERS)}{adjective}"


def answer(prompt: str, rng: random.Random) -> str:
    """One templated answer to one of the simulated users' prompts, in a random tone."""
    subject, verb = SUBJECTS[prompt]
    tone = rng.choice(TONES)
    body = f"{subject} {verb} {_phrase(tone, rng)}"
    if rng.random() < MIXED:
        second = rng.choice(TONES)
        body += f" but {rng.choice(('also', 'sometimes', 'often'))} {_phrase(second, rng)}"
    text = f"{rng.choice(OPENERS)}{body}{rng.choice(ENDINGS[tone])}"
    return text[0].upper() + text[1:]


@dataclass(frozen=True)
class RatedAnswer:
    generation: events_pb2.GenerationEvent
    thumb: int
    sentiment: float


def _hex_id(rng: random.Random) -> str:
    """A random id drawn from `rng`, so a seeded stream is the same stream every time."""
    return f"{rng.getrandbits(128):032x}"


def generation_event(
    prompt: str, response: str, policy_version: int, rng: random.Random
) -> events_pb2.GenerationEvent:
    """A generation event as the generation service publishes it (ids are not signed here)."""
    return events_pb2.GenerationEvent(
        generation_id=_hex_id(rng),
        messages=[common_pb2.ChatMessage(role="user", content=prompt)],
        prompt=prompt,
        response=response,
        policy_version=policy_version,
        finish_reason="eos",
    )


def feedback_event(
    generation: events_pb2.GenerationEvent, rng: random.Random, **signal: object
) -> events_pb2.FeedbackEvent:
    """A feedback event about `generation` carrying one signal, e.g. thumb=THUMB_UP."""
    return events_pb2.FeedbackEvent(
        event_id=_hex_id(rng),
        tenant="synthetic",
        feedback=events_pb2.Feedback(
            generation_id=generation.generation_id, idempotency_key=_hex_id(rng), **signal
        ),
        policy_version=generation.policy_version,
    )


def feedback_stream(
    rounds: int,
    seed: int = 0,
    threshold: float = 0.3,
    policy_version: int = 0,
    rankings: bool = True,
    thumbs: bool = True,
    min_preference: float = INDIFFERENCE,
) -> Iterator[events_pb2.GenerationEvent | events_pb2.FeedbackEvent]:
    """Events of `rounds` user interactions: two answers to one prompt, a thumb on each, and a
    ranking of the two when their sentiment differs by at least `min_preference`."""
    rng = random.Random(seed)
    for _ in range(rounds):
        prompt = rng.choice(PROMPTS)
        rated = []
        for _ in range(2):
            text = answer(prompt, rng)
            event = generation_event(prompt, text, policy_version, rng)
            rated.append(RatedAnswer(event, rate(text, threshold), sentiment(text)))
            yield event
        if thumbs:
            for item in rated:
                yield feedback_event(item.generation, rng, thumb=item.thumb)
        if rankings and abs(rated[0].sentiment - rated[1].sentiment) >= min_preference:
            best, worst = sorted(rated, key=lambda r: r.sentiment, reverse=True)
            ids = [best.generation.generation_id, worst.generation.generation_id]
            ranking = events_pb2.Ranking(generation_ids=ids)
            yield feedback_event(rated[0].generation, rng, ranking=ranking)
