"""The release stage's bookkeeping (services/trainer/release/loop.py): which release is in
force, and thumbs counted by when they were received, whatever order the topics are read in."""

import pytest

from rlhf.algorithms.release import Thumbs
from rlhf.config import ConfigError, load_config
from services.trainer.config import TrainerConfig
from services.trainer.release.loop import Canary, ThumbLedger


def test_a_new_pair_starts_a_new_count_and_the_same_pair_keeps_it():
    canary = Canary().adopt(3, 0, 0.0, at=100.0)
    assert (canary.incumbent, canary.candidate, canary.known) == (3, 0, True)
    canary = canary.adopt(3, 5, 0.1, at=200.0)
    assert (canary.started_at, canary.tried, canary.share) == (200.0, 5, 0.1)
    again = canary.adopt(3, 5, 0.3, at=250.0)  # a share change: the same canary
    assert (again.started_at, again.share) == (200.0, 0.3)
    promoted = again.adopt(5, 0, 0.3, at=300.0)
    assert (promoted.started_at, promoted.share, promoted.tried) == (300.0, 0.0, 5)


def test_which_versions_may_count():
    canary = Canary().adopt(3, 5, 0.1, at=0.0)
    assert canary.counts(3) and canary.counts(5) and canary.counts(6)  # 6: a candidate to come
    assert not canary.counts(4) and not canary.counts(1)


def test_thumbs_count_by_when_they_were_received_not_when_they_were_read():
    ledger = ThumbLedger()
    # Read before the release that starts the canary at t=200 (a replay's interleaving).
    ledger.add(5, True, at=201.5)
    ledger.add(3, False, at=199.0)  # before the canary: not counted
    ledger.add(3, True, at=200.2)  # in the second it started: counted
    canary = Canary().adopt(3, 5, 0.1, at=200.7)
    ledger.prune(canary)
    ledger.add(5, False, at=202.0)
    assert ledger.since(5, canary.started_at) == Thumbs(1, 2)
    assert ledger.since(3, canary.started_at) == Thumbs(1, 1)
    # What the state saves is what it restores.
    assert ThumbLedger(ledger.rows()).since(5, canary.started_at) == Thumbs(1, 2)


def test_pruning_keeps_only_what_the_canary_or_a_later_one_may_count():
    ledger = ThumbLedger()
    for version in (2, 3, 4, 7):
        ledger.add(version, True, at=500.0)
    ledger.add(3, True, at=10.0)
    canary = Canary().adopt(3, 4, 0.1, at=400.0)
    ledger.prune(canary)
    assert sorted((v, s) for v, s, _, _ in ledger.rows()) == [(3, 500), (4, 500), (7, 500)]


@pytest.mark.parametrize(
    "environ",
    [
        {"RLHF_CANARY_SHARE": "0"},
        {"RLHF_CANARY_SHARE": "1.5"},
        {"RLHF_RELEASE_MIN_THUMBS": "1"},
        {"RLHF_RELEASE_PROMOTE_ERROR": "0.6"},
        {"RLHF_RELEASE_MAX_SECONDS": "0"},
    ],
)
def test_release_settings_out_of_range_are_refused(environ):
    with pytest.raises(ConfigError):
        load_config(TrainerConfig, {"RLHF_TRAINER_STAGE": "release", **environ})


def test_release_settings_become_the_test():
    config = load_config(
        TrainerConfig, {"RLHF_RELEASE_MIN_THUMBS": "250", "RLHF_RELEASE_MARGIN": "0.01"}
    )
    test = config.release.test()
    assert (test.min_ratings, test.margin, test.promote_error) == (250, 0.01, 0.05)
