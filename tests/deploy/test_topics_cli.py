"""`python -m rlhf.topics_cli`, the chart's topic creation job: specs, checks, a real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from kafka import KafkaAdminClient

from rlhf import bus, topics_cli
from rlhf.broker import EmbeddedBroker, free_port


def test_specs_take_bus_topics_and_the_operators_durability():
    specs = topics_cli.topic_specs(
        partitions=6,
        replication_factor=3,
        retention_ms=86_400_000,
        dead_letter_retention_ms=999,
        min_insync_replicas=2,
    )
    assert set(specs) == set(bus.ALL_TOPICS)
    for spec in specs.values():
        assert spec["replication_factor"] == 3
        assert spec["configs"]["min.insync.replicas"] == "2"
    for topic in (bus.GENERATIONS, bus.FEEDBACK):
        assert specs[topic]["num_partitions"] == 6
        assert specs[topic]["configs"]["retention.ms"] == "86400000"
    assert specs[bus.DEAD_LETTER]["configs"]["retention.ms"] == "999"
    # Checkpoint events stay totally ordered and kept forever, whatever the operator asks.
    for topic in (bus.POLICY_CHECKPOINTS, bus.REWARD_CHECKPOINTS):
        assert specs[topic]["num_partitions"] == 1
        assert specs[topic]["configs"]["retention.ms"] == "-1"


def test_specs_leave_broker_defaults_alone_when_not_asked():
    specs = topics_cli.topic_specs(partitions=3, replication_factor=1)
    assert specs[bus.GENERATIONS]["configs"] == {}
    assert specs[bus.DEAD_LETTER]["configs"] == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"partitions": 0, "replication_factor": 1},
        {"partitions": 3, "replication_factor": 0},
        {"partitions": 3, "replication_factor": 2, "min_insync_replicas": 3},
    ],
)
def test_specs_refuse_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        topics_cli.topic_specs(**kwargs)


def test_generations_and_feedback_must_share_their_partition_count():
    specs = topics_cli.topic_specs(partitions=6, replication_factor=1)
    counts = {topic: spec["num_partitions"] for topic, spec in specs.items()}
    assert topics_cli.check_partitions(counts, specs) == []
    grown = dict(counts, **{bus.DEAD_LETTER: 3})
    (warning,) = topics_cli.check_partitions(grown, specs)
    assert bus.DEAD_LETTER in warning and "left unchanged" in warning
    with pytest.raises(topics_cli.TopicsError, match="must match"):
        topics_cli.check_partitions(dict(counts, **{bus.FEEDBACK: 3}), specs)


def test_main_fails_on_mismatched_existing_topics(monkeypatch, caplog):
    def existing(bootstrap, specs, timeout):
        return {topic: 4 if topic == bus.FEEDBACK else 6 for topic in specs}

    monkeypatch.setattr(topics_cli, "create_topics", existing)
    assert topics_cli.main(["--bootstrap", "kafka:9092", "--replication-factor", "1"]) == 1
    assert "must match" in caplog.text


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running


def _run(*args: str, bootstrap: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RLHF_KAFKA_BOOTSTRAP=bootstrap)
    return subprocess.run(
        [sys.executable, "-m", "rlhf.topics_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_creates_the_topics_on_a_real_broker_and_is_idempotent(broker):
    args = ("--partitions", "4", "--replication-factor", "1", "--retention-ms", "3600000")
    first = _run(*args, "--timeout", "20", bootstrap=broker.bootstrap)
    assert first.returncode == 0, first.stderr
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
    finally:
        admin.close()
    assert {topic: described[topic] for topic in bus.ALL_TOPICS} == {
        bus.GENERATIONS: 4,
        bus.FEEDBACK: 4,
        bus.DEAD_LETTER: 4,
        bus.POLICY_CHECKPOINTS: 1,
        bus.REWARD_CHECKPOINTS: 1,
        bus.RELEASES: 1,
    }
    # Upgrades run it again, possibly with other values: nothing changes, it says so.
    again = _run("--partitions", "6", "--replication-factor", "1", bootstrap=broker.bootstrap)
    assert again.returncode == 0, again.stderr
    assert "already exists" in again.stderr
    assert f"{bus.GENERATIONS} exists with 4 partitions (requested 6)" in again.stderr


def test_unreachable_kafka_fails_after_the_timeout():
    start = time.monotonic()
    result = _run("--timeout", "1", bootstrap=f"127.0.0.1:{free_port()}", timeout=30)
    assert result.returncode == 1
    assert "unreachable" in result.stderr or "failed" in result.stderr
    assert time.monotonic() - start < 20
