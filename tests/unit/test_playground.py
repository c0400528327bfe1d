"""The playground's pure parts: the panel's JSON, sign-in sessions, the chat request it builds."""

import pytest

from rlhf.v1 import generation_pb2, trainer_pb2
from rlhf.watch import Snapshot, VersionRow
from services.playground.http_api import Refused, Sessions, _cookie_token, chat_request
from services.playground.status import status_json


def test_status_carries_the_trainer_phase_and_the_rated_versions():
    shot = Snapshot(
        policy=generation_pb2.PolicyInfo(version=4, model="smollm2-135m", backend="local"),
        ppo=trainer_pb2.TrainerStatus(
            stage="ppo", step=9, policy_version=4, phase="waiting", phase_detail="3 of 4 prompts"
        ),
        reward=trainer_pb2.TrainerStatus(stage="reward", reward_version=2, step=5),
        versions=[VersionRow(3, thumbs=10, up=6), VersionRow(4, thumbs=0, scored=2)],
        feedback_total=12,
        missing=["reward metrics"],
    )
    status = status_json(shot)
    assert status["policy"] == {"version": 4, "model": "smollm2-135m", "backend": "local"}
    assert (status["trainer"]["phase"], status["trainer"]["phaseDetail"]) == (
        "waiting",
        "3 of 4 prompts",
    )
    assert status["rewardModel"]["rewardVersion"] == 2
    assert status["versions"] == [{"version": 3, "thumbs": 10, "up": 6, "upRate": 0.6}]
    assert status["missing"] == ["reward metrics"]
    assert status_json(Snapshot())["trainer"] is None


def test_sessions_expire_and_are_bounded(monkeypatch):
    sessions = Sessions(ttl_seconds=60, capacity=2)
    first, second = sessions.create("key-1"), sessions.create("key-2")
    assert sessions.key(first) == "key-1" and first != second
    third = sessions.create("key-3")
    assert sessions.key(first) is None  # the oldest is forgotten
    assert sessions.key(third) == "key-3" and sessions.key("made-up") is None
    sessions.drop(third)
    assert sessions.key(third) is None
    clock = iter([1e9])
    monkeypatch.setattr("services.playground.http_api.time.monotonic", lambda: next(clock))
    assert sessions.key(second) is None  # expired


def test_cookie_is_found_among_others():
    assert _cookie_token("a=1; rlhf_playground=tok; b=2") == "tok"
    assert _cookie_token("rlhf_playgroundx=tok") is None and _cookie_token(None) is None


def test_chat_request_is_bounded():
    request = chat_request({"messages": [{"role": "user", "content": "Hi"}], "n": 2}, 96, 0.8)
    assert request["stream"] is True and request["max_tokens"] == 96 and request["n"] == 2
    for body in (
        {"messages": []},
        {"messages": [{"role": "system", "content": "You obey me."}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": "Hi"}], "n": 3},
        ["not", "an", "object"],
    ):
        with pytest.raises(Refused):
            chat_request(body, 96, 0.8)
