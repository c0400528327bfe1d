from rlhf.joining import FeedbackJoin, PartitionJoin
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


# PartitionJoin: one partition's join for a member of a consumer group ------------------------


def _ranking(chosen, ids, event_id):
    ranking = events_pb2.Ranking(generation_ids=ids)
    return events_pb2.FeedbackEvent(
        event_id=event_id, feedback=events_pb2.Feedback(generation_id=chosen, ranking=ranking)
    )


def _ids(joined):
    return [j.feedback.event_id for j in joined]


def test_partition_join_joins_in_offset_order_and_commits_what_is_done():
    join = PartitionJoin()
    assert join.commit_offset() is None  # nothing read: nothing to commit
    join.add_generation(_generation("a"))
    assert _ids(join.add_feedback(10, _feedback("a", event_id="e10"))) == ["e10"]
    assert join.commit_offset() == 11
    # Feedback ahead of its generation waits, and so does what follows it, even if joinable:
    # the commit stays at the first event not joined, so a next owner re-reads exactly those.
    assert join.add_feedback(11, _feedback("b", event_id="e11")) == []
    assert join.add_feedback(12, _feedback("a", events_pb2.THUMB_DOWN, event_id="e12")) == []
    assert (join.waiting, join.commit_offset()) == (2, 11)
    assert _ids(join.add_generation(_generation("b"))) == ["e11", "e12"]
    assert (join.waiting, join.commit_offset()) == (0, 13)


def test_partition_join_joins_a_ranking_only_with_every_generation_it_orders():
    join = PartitionJoin()
    join.add_generation(_generation("x"))
    assert join.add_feedback(0, _ranking("x", ["y", "x", "z"], "rank")) == []
    assert join.add_generation(_generation("z")) == []
    [joined] = join.add_generation(_generation("y"))
    assert joined.generation.generation_id == "x"
    assert all(join.generation(gid) is not None for gid in "xyz")


def test_partition_join_drops_repeats_of_an_event_id():
    join = PartitionJoin()
    join.add_generation(_generation("a"))
    assert _ids(join.add_feedback(0, _feedback("a", event_id="same"))) == ["same"]
    assert join.add_feedback(1, _feedback("a", event_id="same")) == []
    assert (join.duplicates, join.commit_offset()) == (1, 2)  # a repeat is done, not waiting


def test_partition_join_gives_up_only_on_feedback_read_before_the_cutoff():
    join = PartitionJoin()
    join.add_generation(_generation("ok"))
    join.add_feedback(5, _feedback("never", event_id="lost"), read_at=1.0)
    join.add_feedback(6, _feedback("ok", event_id="held"), read_at=1.0)
    join.add_feedback(7, _feedback("later", event_id="new"), read_at=9.0)
    assert join.oldest_wait() == 1.0
    # "lost" is dropped and "held" joins; "new" was read after the cutoff: its generation may
    # still come, so it keeps waiting.
    assert _ids(join.give_up_waiting(read_before=5.0)) == ["held"]
    assert (join.given_up, join.waiting, join.commit_offset()) == (1, 1, 7)


def test_partition_join_bounds_its_generations():
    join = PartitionJoin(max_generations=2)
    for gid in "abc":
        join.add_generation(_generation(gid))
    assert join.evicted == 1 and join.generation("a") is None and join.generation("c")
