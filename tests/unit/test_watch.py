"""The `make up` view's numbers: the thumbs-up trend by wall-clock window with its interval,
and the recipe's steps, from snapshots of the services' answers."""

import pytest
from rich.console import Console

from rlhf.v1 import generation_pb2, trainer_pb2
from rlhf.watch import Snapshot, Trend, VersionRow, Window, wilson
from services.launcher.view import line, panel, recipe


def test_wilson_interval_by_hand():
    # 3 of 3 at 90%: centre (1 + z^2/6) / (1 + z^2/3), half z*sqrt(z^2/36)/(1 + z^2/3).
    z = 1.6449
    low, high = wilson(3, 3)
    assert high == pytest.approx(1.0)
    assert low == pytest.approx((1 + z * z / 6 - z * z / 6) / (1 + z * z / 3), abs=1e-9)
    assert low == pytest.approx(0.526, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(50, 100)
    assert 0.41 < low < 0.42 and 0.58 < high < 0.59  # about 0.5 +- 1.645 * 0.05


def test_the_trend_counts_the_thumbs_of_each_window():
    trend = Trend(window=60.0, points=3)
    trend.add(1000.0, up=5, total=10)  # what came before the view started does not count
    trend.add(1030.0, up=7, total=14)
    trend.add(1070.0, up=9, total=20)  # closes 0-60 s: everything up to this reading
    assert trend.windows(1070.0) == [Window(0.0, 60.0, 4, 10), Window(60.0, 70.0, 0, 0)]
    trend.add(1250.0, up=19, total=30)  # three windows end at once: the thumbs go to the first
    windows = trend.windows(1250.0)
    assert [(w.start, w.up, w.total) for w in windows] == [
        (60.0, 10, 10),
        (120.0, 0, 0),
        (180.0, 0, 0),
        (240.0, 0, 0),
    ]
    assert windows[0].rate == 1.0 and windows[1].rate is None


def _status(**fields):
    return trainer_pb2.TrainerStatus(**fields)


def test_the_recipe_follows_the_platform_through_its_phases():
    shot = Snapshot(
        ppo=_status(stage="ppo", phase="waiting", phase_detail="no PPO until v1"),
        reward=_status(stage="reward", phase="collecting"),
    )
    assert [done for _, done in recipe(shot)] == [False, False, False, False]
    shot.versions = [VersionRow(0, thumbs=40, up=12)]
    shot.reward = _status(stage="reward", reward_version=1)
    assert [done for _, done in recipe(shot)] == [True, True, False, False]
    shot.ppo = _status(stage="ppo", step=12, phase="training")
    shot.reward = _status(stage="reward", reward_version=2)
    assert [done for _, done in recipe(shot)] == [True, True, True, True]
    assert recipe(shot)[2][0] == "PPO (step 12)"  # a status without an algorithm: PPO
    shot.ppo = _status(stage="ppo", step=3, phase="training", algorithm="grpo")
    assert recipe(shot)[2] == ("GRPO (step 3)", True)  # the algorithm make up runs, named


def test_the_panel_and_the_line_show_phases_and_the_trend():
    shot = Snapshot(
        policy=generation_pb2.PolicyInfo(version=3, model="tiny-random"),
        ppo=_status(
            stage="ppo",
            step=4,
            policy_version=3,
            reward_version=1,
            phase="training",
            phase_detail="PPO on batches of 8 prompts with feedback",
        ),
        reward=_status(
            stage="reward",
            reward_version=1,
            phase="collecting",
            phase_detail="10 of 48 new examples for a round",
        ),
        versions=[VersionRow(0, thumbs=30, up=9), VersionRow(3, thumbs=10, up=7)],
        trend=[Window(0.0, 120.0, 9, 30), Window(120.0, 150.0, 7, 10)],
    )
    console = Console(record=True, width=160)
    console.print(panel(shot, "footer", uptime=150))
    text = console.export_text()
    assert "training: PPO on batches of 8 prompts with feedback" in text
    assert "collecting: 10 of 48 new examples for a round" in text
    assert "0:00-2:00" in text and "30%" in text and "70%" in text
    low, high = wilson(7, 10)
    assert f"({low:.0%}-{high:.0%})" in text
    assert "✓ reward model v1" in text and "✓ PPO (step 4)" in text
    plain = line(shot)
    assert "thumbs-up last 2 min 70% of 10" in plain and "training)" in plain


def test_with_releases_the_view_shows_the_canary_its_thumbs_verdict_gate_and_decision():
    release = trainer_pb2.ReleaseStatus(
        incumbent_version=3,
        candidate_version=5,
        candidate_share=0.5,
        incumbent_thumbs_up=40,
        incumbent_thumbs=100,
        candidate_thumbs_up=60,
        candidate_thumbs=100,
        verdict="collecting",
        difference=0.2,
        lower=-0.05,
        upper=0.45,
        last_decision="v4 refused by the gate against v3: repetition: 60.0% repeated bigrams",
        gate=trainer_pb2.ReleaseGate(
            candidate_version=5, incumbent_version=3, passed=True, summary="v5 passed the gate"
        ),
    )
    shot = Snapshot(
        policy=generation_pb2.PolicyInfo(
            version=3, model="tiny-random", candidate_version=5, candidate_share=0.5
        ),
        release=_status(
            stage="release", phase="training", phase_detail="canary v5", release=release
        ),
        versions=[VersionRow(3, thumbs=100, up=40), VersionRow(5, thumbs=100, up=60)],
    )
    console = Console(record=True, width=200)
    console.print(panel(shot, "footer", uptime=60))
    text = console.export_text()
    assert "v5 answers 50% against v3" in text
    assert "candidate 60/100 up (60%), incumbent 40/100 up (40%)" in text
    assert "collecting (difference +0.20, [-0.05, +0.45])" in text
    assert "v5 passed the gate" in text
    assert "v4 refused by the gate against v3" in text
    assert "v3 (served)" in text and "v5 (canary 50%)" in text
    plain = line(shot)
    assert "canary v5 answers 50% against v3" in plain and "v4 refused" in plain
    idle = Snapshot(release=_status(release=trainer_pb2.ReleaseStatus(incumbent_version=3)))
    assert "none: v3 answers everyone" in line(idle)
    assert "canary" not in line(Snapshot())  # no release stage watched: nothing about it
