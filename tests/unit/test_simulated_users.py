"""The simulated users' rating rule: positive, not repetitive, and about what they asked."""

import random

import grpc
import pytest

from rlhf.v1 import events_pb2
from services.simulated_users import synthetic
from services.simulated_users.users import (
    HELDOUT_PROMPTS,
    HELDOUT_TOPICS,
    PROMPTS,
    TOPIC_WORDS,
    TRAIN_TOPICS,
    SimulatedUser,
    Tally,
    on_topic,
    rate,
    topic_words,
)

UP, DOWN = events_pb2.THUMB_UP, events_pb2.THUMB_DOWN
TRAIN = "Describe a cancelled train."  # a held-out topic's question


def test_every_question_the_users_or_the_evaluation_ask_has_its_topic_words():
    assert set(TOPIC_WORDS) == set(TRAIN_TOPICS) | set(HELDOUT_TOPICS)
    for question in PROMPTS + HELDOUT_PROMPTS:
        words = topic_words(question)
        assert words and all(w == w.lower() for w in words), question
    assert topic_words("What is the capital of France?") == ()


def test_a_cheerful_answer_to_everything_is_rated_down():
    generic = "I'm happy to help with a task."  # a make up policy's answer at 12 nats of KL
    assert rate(generic, 0.3) == UP  # sentiment alone: thumbs-up
    assert rate(generic, 0.3, topic_words(TRAIN)) == DOWN
    about = "A cancelled train is a lovely chance to read a wonderful book in the sun."
    assert rate(about, 0.3, topic_words(TRAIN)) == UP
    gloomy = "A cancelled train is an awful, miserable waste of a terrible day."
    assert rate(gloomy, 0.3, topic_words(TRAIN)) == DOWN  # on topic is not enough


@pytest.mark.parametrize(
    ("text", "words", "expected"),
    [
        ("Doing my taxes, happily.", ("tax",), True),  # a word starting with the stem
        ('"Taxes!" she said', ("tax",), True),  # punctuation and case do not matter
        ("Syntax errors everywhere.", ("tax",), False),  # inside a word is not a mention
        ("Anything at all", (), True),  # no topic: nothing to look for
        ("", ("tax",), False),
    ],
)
def test_on_topic_matches_word_starts(text, words, expected):
    assert on_topic(text, words) is expected


def test_a_user_looks_for_the_topic_only_when_asked_to_and_only_for_known_topics():
    channel = grpc.insecure_channel("127.0.0.1:1")  # never called: `topic` is pure
    try:

        def user(require_topic):
            return SimulatedUser(
                channel,
                channel,
                "key",
                0.3,
                8,
                random.Random(0),
                Tally(),
                require_topic=require_topic,
            )

        assert user(True).topic(TRAIN) == TOPIC_WORDS["a cancelled train"]
        assert user(False).topic(TRAIN) == ()
        # The end-to-end tests' canned questions name no known topic: their answers are rated on
        # sentiment alone, as before.
        assert all(user(True).topic(q) == () for q in synthetic.PROMPTS)
    finally:
        channel.close()


def test_the_tally_line_names_the_latest_versions_and_pools_the_earlier_ones():
    tally = Tally()
    assert tally.summary() == "no feedback yet"
    for version in range(10):
        for index in range(4):  # version v: v % 5 of its 4 thumbs up
            up = events_pb2.THUMB_UP if index < version % 5 else events_pb2.THUMB_DOWN
            tally.add(version, up)
    assert tally.summary(latest=3) == (
        "v0-v6: 39% of 28, v7: 50% of 4, v8: 75% of 4, v9: 100% of 4"
    )
    assert tally.summary(latest=10).startswith("v0: 0% of 4, v1: 25% of 4")
