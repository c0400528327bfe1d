"""The PPO trainer's intake: joining, skipping what cannot be rolled out, the staleness bound,
backpressure, and a snapshot that survives the trip through checkpoint files."""

from unittest import mock

from rlhf import bus
from rlhf.joining import Ledger
from rlhf.training.state import intake_files, intake_from_files
from rlhf.v1 import events_pb2
from services.trainer.ppo.intake import Intake


def _record(topic, message, offset=0):
    return bus.Record(
        topic=topic, partition=0, offset=offset, key="k", message=message, timestamp_ms=0
    )


def _generation(gid, prompt_ids=(1, 2), created=None):
    event = events_pb2.GenerationEvent(generation_id=gid, prompt_token_ids=list(prompt_ids))
    if created is not None:
        event.created_at.FromNanoseconds(int(created * 1e9))
    return event


def _feedback(gid, event_id=None):
    return events_pb2.FeedbackEvent(
        event_id=event_id or f"e-{gid}",
        feedback=events_pb2.Feedback(generation_id=gid, thumb=events_pb2.THUMB_UP),
    )


def _pair(gid, prompt_ids=(1, 2), created=None):
    return [
        _record(bus.GENERATIONS, _generation(gid, prompt_ids, created)),
        _record(bus.FEEDBACK, _feedback(gid)),
    ]


def _intake(**kwargs):
    return Intake(mock.Mock(), max_prompt_tokens=kwargs.pop("max_prompt_tokens", 4), **kwargs)


def _filled(gids, **kwargs):
    """An intake that has joined a generation and its feedback for each of `gids`, in order."""
    intake = _intake(**kwargs)
    for gid in gids:
        for record in _pair(gid):
            intake.handle(record)
    return intake


def test_prompts_without_tokens_or_too_long_are_skipped():
    intake = _intake()
    for record in [*_pair("ok"), *_pair("empty", []), *_pair("long", [1] * 5)]:
        intake.handle(record)
    assert len(intake) == 1 and intake.skipped_prompts == 2
    assert intake.feedback_consumed == 3
    [joined], _ = intake.take(5)
    assert joined.generation.generation_id == "ok"


def test_prompts_older_than_the_staleness_bound_are_dropped_and_the_age_reported():
    now = 10_000.0
    intake = _intake(max_staleness_seconds=60, clock=lambda: now)
    for record in [*_pair("old", created=now - 61), *_pair("fresh", created=now - 30)]:
        intake.handle(record)
    intake.handle(_record(bus.GENERATIONS, _generation("undated")))
    intake.handle(_record(bus.FEEDBACK, _feedback("undated")))
    batch, oldest = intake.take(5)
    assert [j.generation.generation_id for j in batch] == ["fresh", "undated"]
    assert oldest == 30.0 and intake.stale_prompts == 1


def test_newest_first_takes_current_traffic_and_drops_the_stale_head():
    """RLHF_PPO_PROMPT_ORDER=newest: a trainer behind its users trains on what they ask now;
    what waited past the bound is dropped at the next take, not held until its turn."""
    now = 10_000.0
    intake = _intake(max_staleness_seconds=60, clock=lambda: now, newest_first=True)
    ages = {"stale1": 90, "stale2": 70, "a": 50, "b": 40, "c": 30, "d": 20, "e": 10}
    for gid, age in ages.items():
        for record in _pair(gid, created=now - age):
            intake.handle(record)
    batch, oldest = intake.take(2)
    assert [j.generation.generation_id for j in batch] == ["e", "d"] and oldest == 20.0
    assert intake.stale_prompts == 2 and len(intake) == 3, "the stale head went at once"
    intake.put_back(batch)  # e.g. the reward service was down: the same batch comes again
    assert [j.generation.generation_id for j in intake.take(2)[0]] == ["e", "d"]
    now += 15.0  # "a" is 65 s old now, "b" 55 s
    batch, oldest = intake.take(5)
    assert [j.generation.generation_id for j in batch] == ["c", "b"] and oldest == 55.0
    assert intake.stale_prompts == 3 and len(intake) == 0


def test_oldest_first_takes_every_prompt_in_turn():
    intake = _filled("abc")
    batch, _ = intake.take(2)
    assert [j.generation.generation_id for j in batch] == ["a", "b"]
    intake.put_back(batch)
    assert [j.generation.generation_id for j in intake.take(3)[0]] == ["a", "b", "c"]


def test_a_full_queue_pauses_fetching_until_half_of_it_is_taken():
    intake = _filled("abcd", max_queued=4)
    assert intake.wants_fetch_paused(False)
    intake.take(1)
    assert intake.wants_fetch_paused(True), "stays paused above half"
    intake.take(1)
    assert not intake.wants_fetch_paused(True)


def test_newest_first_a_full_queue_drops_its_oldest_and_fetching_goes_on():
    intake = _filled("abcdef", max_queued=4, newest_first=True)
    assert not intake.wants_fetch_paused(False) and not intake.wants_fetch_paused(True)
    assert len(intake) == 4 and intake.overflow_prompts == 2
    restored = _intake(newest_first=True)
    restored.restore(intake_from_files(*intake_files(intake.snapshot()), Intake.messages))
    assert restored.overflow_prompts == 2
    batch, _ = restored.take(10)
    assert [j.generation.generation_id for j in batch] == ["f", "e", "d", "c"]


def test_used_feedback_is_counted_in_the_ledger():
    intake = _filled("ab")
    batch, _ = intake.take(2)
    intake.mark_used(batch)
    assert intake.used == Ledger.of(["e-a", "e-b"])
    assert intake.used != Ledger.of(["e-a", "e-a"]), "a repeat and a loss do not cancel out"


def test_a_snapshot_round_trips_through_checkpoint_files_and_restores_the_join():
    intake = _intake()
    intake.handle(_record(bus.GENERATIONS, _generation("waiting")))  # no feedback yet
    intake.handle(_record(bus.FEEDBACK, _feedback("early")))  # no generation yet
    for record in _pair("queued"):
        intake.handle(record)
    intake.offsets = {(bus.GENERATIONS, 0): 7, (bus.FEEDBACK, 2): 3}
    intake.mark_used([])
    snapshot = intake.snapshot()

    restored = _intake()
    restored.restore(intake_from_files(*intake_files(snapshot), Intake.messages))

    assert restored.offsets == intake.offsets
    assert [j.generation.generation_id for j in restored.take(5)[0]] == ["queued"]
    # The generation that was waiting joins feedback arriving after the restart...
    restored.handle(_record(bus.FEEDBACK, _feedback("waiting")))
    # ...the feedback that was waiting joins its generation...
    restored.handle(_record(bus.GENERATIONS, _generation("early")))
    # ...and a replay of feedback seen before the checkpoint is dropped as a duplicate.
    restored.handle(_record(bus.FEEDBACK, _feedback("queued")))
    batch, _ = restored.take(5)
    assert sorted(j.generation.generation_id for j in batch) == ["early", "waiting"]
    assert restored.feedback_consumed == intake.feedback_consumed + 2
