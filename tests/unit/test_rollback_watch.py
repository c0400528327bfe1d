"""Which release events end a canary without promoting it (rlhf.canary.RollbackWatch): what the
ppo stage follows with RLHF_PPO_FOLLOW_ROLLBACKS."""

from rlhf.canary import RollbackWatch, RolledBack
from rlhf.v1 import events_pb2


def _release(incumbent: int, candidate: int = 0, at: int = 0) -> events_pb2.ReleaseEvent:
    event = events_pb2.ReleaseEvent(incumbent_version=incumbent, candidate_version=candidate)
    if at:
        event.decided_at.FromSeconds(at)
    return event


def test_only_a_return_to_the_incumbent_alone_is_a_rollback():
    watch = RollbackWatch()
    seen = [
        watch.see(event)
        for event in (
            _release(0),  # the initial release: nothing ended
            _release(0, 3),  # canary of v3
            _release(0, at=1_000),  # v3 rolled back (or expired): v0 serves alone
            _release(0, 5),  # canary of v5
            _release(5),  # promoted: not a rollback
            _release(5, 7),  # canary of v7
            _release(2),  # an operator's release of another version: not a rollback
            _release(2),  # the same release again: no canary ended
        )
    ]
    assert seen == [None, None, RolledBack(3, 0, 1_000.0), None, None, None, None, None]


def test_the_first_event_read_is_never_a_rollback():
    # A watch that starts mid-topic has no previous release to compare with.
    assert RollbackWatch().see(_release(4)) is None


def test_a_rollback_without_a_time_says_zero():
    watch = RollbackWatch()
    watch.see(_release(1, 2))
    assert watch.see(_release(1)) == RolledBack(2, 1, 0.0)
