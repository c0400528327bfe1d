"""The PPO trainer's intake: joined prompts it cannot roll out are skipped, not fatal."""

from unittest import mock

from rlhf import bus
from rlhf.v1 import events_pb2
from services.trainer.loop import Intake


def _record(topic, message):
    return bus.Record(topic=topic, partition=0, offset=0, key="k", message=message, timestamp_ms=0)


def _pair(gid, prompt_ids):
    generation = events_pb2.GenerationEvent(generation_id=gid, prompt_token_ids=prompt_ids)
    feedback = events_pb2.FeedbackEvent(
        event_id=f"e-{gid}",
        feedback=events_pb2.Feedback(generation_id=gid, thumb=events_pb2.THUMB_UP),
    )
    return [_record(bus.GENERATIONS, generation), _record(bus.FEEDBACK, feedback)]


def test_prompts_without_tokens_or_too_long_are_skipped():
    intake = Intake(mock.Mock(), max_prompt_tokens=4)
    for record in [*_pair("ok", [1, 2]), *_pair("empty", []), *_pair("long", [1] * 5)]:
        intake.handle(record)
    assert len(intake) == 1 and intake.skipped_prompts == 2
    assert intake.feedback_consumed == 3
    [joined] = intake.take(5)
    assert joined.generation.generation_id == "ok"
