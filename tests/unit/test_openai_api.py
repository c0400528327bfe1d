"""The OpenAI adapter's pure parts: request parsing and the stream's stop-sequence hold-back."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rlhf import decoding
from services.generation.openai_api import ChatRejected, StopHoldback, parse_chat

MESSAGES = [{"role": "user", "content": "Hi"}]


def _parse(**body):
    return parse_chat({"model": "m", "messages": MESSAGES, **body}, 64, 4)


def test_choices_get_consecutive_seeds_and_the_openai_defaults():
    request = _parse(n=3, seed=2**64 - 2, max_completion_tokens=9)
    assert [p.seed for p in request.sampling] == [2**64 - 2, 2**64 - 1, 0]
    assert {p.max_new_tokens for p in request.sampling} == {9}
    assert {p.temperature for p in request.sampling} == {1.0}  # OpenAI's default, not greedy
    assert not any(p.HasField("seed") for p in _parse(n=2).sampling)


def test_roles_and_text_parts():
    request = _parse(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ]
    )
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "ab"),
    ]
    with pytest.raises(ChatRejected) as caught:
        _parse(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert caught.value.param == "messages[0].content"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"n": 5}, "n"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"top_logprobs": 1, "logprobs": True}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_refusals_name_the_parameter(body, param):
    with pytest.raises(ChatRejected) as caught:
        _parse(**body)
    assert caught.value.param == param


def test_neutral_values_of_unsupported_parameters_are_accepted():
    request = _parse(
        frequency_penalty=0, presence_penalty=0.0, tools=[], logit_bias={}, top_logprobs=0
    )
    assert len(request.sampling) == 1


@given(
    text=st.text(alphabet="abc<>", max_size=30),
    stops=st.lists(st.text(alphabet="abc<>", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
@example(text="<<><", stops=[">", "<><"], cuts=[3])  # a longer stop that begins earlier
@settings(max_examples=300)
def test_streamed_text_is_the_cut_text_and_never_shows_a_stop(text, stops, cuts):
    holdback = StopHoldback(stops)
    pieces, start = [], 0
    for cut in sorted(cuts) + [len(text)]:
        pieces.append(text[start:cut])
        start = max(start, cut)
    sent = ""
    for piece in pieces:
        sent += holdback.push(piece)
        assert not any(stop in sent for stop in stops)
    final = decoding.cut_at_stop(text, stops)
    assert sent + holdback.finish(final) == final
