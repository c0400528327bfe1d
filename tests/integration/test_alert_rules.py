"""The Prometheus alert rules for reward drift: valid, unit-tested by promtool, and reading
metrics the services really export."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import rlhf.drift  # noqa: F401  (registers the live reward metrics)
import services.feedback.servicer  # noqa: F401  (registers rlhf_feedback_thumbs_total)
import services.trainer.release.loop  # noqa: F401  (registers the release stage metrics)
import services.trainer.reward.loop  # noqa: F401  (registers the reward stage metrics)

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "rules_test.yml"

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package prometheus; `make system-packages`)",
)


def promtool(*args, cwd=PROMETHEUS):
    return subprocess.run(
        ["promtool", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_rules_are_valid():
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 13 rules found" in result.stdout


def test_rules_pass_their_unit_tests():
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_catch_a_wrong_threshold(tmp_path):
    """The rule tests have teeth: a thumbs-up drop threshold of 30 points instead of 10 makes
    them fail (the test scenario drops 20 points)."""
    (tmp_path / "tests").mkdir()
    text = RULES.read_text()
    baseline = "rlhf:feedback_thumbs_up_ratio:rate6h_offset30m"
    loosened = text.replace(f"{baseline} - 0.1", f"{baseline} - 0.3")
    assert loosened != text
    (tmp_path / "rules.yml").write_text(loosened)
    shutil.copy(RULE_TESTS, tmp_path / "tests" / "rules_test.yml")
    result = promtool("test", "rules", "tests/rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "ThumbsUpRateDrop" in result.stdout + result.stderr


def test_every_metric_the_rules_read_is_exported():
    """Names in the rules must match what the services register, or the alerts never fire."""
    rules = "\n".join(line.split("#")[0] for line in RULES.read_text().splitlines())
    read = set(re.findall(r"\brlhf_[a-z0-9_]+", rules))
    assert {
        "rlhf_reward_live_sum",
        "rlhf_feedback_thumbs_total",
        "rlhf_release_verdicts_total",
    } <= read
    # Every sample name (including _total, _sum, _count, _bucket) of registered collectors.
    exported = set(REGISTRY._names_to_collectors)
    assert read <= exported, f"not exported by any service: {sorted(read - exported)}"
