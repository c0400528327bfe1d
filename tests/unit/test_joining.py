from rlhf.joining import FeedbackJoin
from rlhf.v1 import events_pb2


def _generation(gid):
    return events_pb2.GenerationEvent(generation_id=gid, prompt=f"prompt {gid}")


def _feedback(gid, thumb=events_pb2.THUMB_UP, event_id=None):
    """Event ids identify one submission (the feedback service derives them from its key)."""
    return events_pb2.FeedbackEvent(
        event_id=event_id or f"e-{gid}-{thumb}",
        feedback=events_pb2.Feedback(generation_id=gid, thumb=thumb),
    )


def test_feedback_after_generation_joins_at_once():
    join = FeedbackJoin()
    assert join.add_generation(_generation("a")) == []
    [joined] = join.add_feedback(_feedback("a"))
    assert joined.generation.prompt == "prompt a"


def test_feedback_before_generation_waits_for_it():
    join = FeedbackJoin()
    assert join.add_feedback(_feedback("b")) == []
    assert join.add_feedback(_feedback("b", events_pb2.THUMB_DOWN)) == []
    joined = join.add_generation(_generation("b"))
    assert [j.feedback.feedback.thumb for j in joined] == [
        events_pb2.THUMB_UP,
        events_pb2.THUMB_DOWN,
    ]
    assert join.add_generation(_generation("b")) == []  # orphans are released once


def test_memory_is_bounded_oldest_first():
    join = FeedbackJoin(max_pending=2)
    for gid in "abc":
        join.add_generation(_generation(gid))
    assert join.evicted == 1
    assert join.add_feedback(_feedback("a")) == []  # evicted
    assert len(join.add_feedback(_feedback("c"))) == 1


def test_a_resent_event_is_joined_once_whichever_side_arrives_first():
    join = FeedbackJoin()
    assert join.add_feedback(_feedback("d", event_id="same")) == []
    assert join.add_feedback(_feedback("d", event_id="same")) == []  # copy while waiting
    assert len(join.add_generation(_generation("d"))) == 1
    assert join.add_feedback(_feedback("d", event_id="same")) == []  # copy after the join
    assert len(join.add_feedback(_feedback("d", event_id="other"))) == 1
    assert join.duplicates == 2


def test_remembered_event_ids_are_bounded():
    join = FeedbackJoin(remembered_feedback=2)
    join.add_generation(_generation("e"))
    for event_id in ("x", "y", "z"):
        assert len(join.add_feedback(_feedback("e", event_id=event_id))) == 1
    assert len(join.add_feedback(_feedback("e", event_id="x"))) == 1  # forgotten: joined again
    assert join.add_feedback(_feedback("e", event_id="z")) == []
