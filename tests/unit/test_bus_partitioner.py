"""The bus's faster key hash must partition exactly like kafka-python's (and Java's) default:
a generation and the feedback on it share a partition only if every producer agrees."""

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import DefaultPartitioner
from kafka.partitioner.default import murmur2 as reference_murmur2

from rlhf.bus import (
    DEAD_LETTER,
    FEEDBACK,
    GENERATIONS,
    KeyHashPartitioner,
    PartitionMismatch,
    check_copartitioned,
    murmur2,
    topic_specs,
)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_murmur2_matches_kafka_python(data):
    assert murmur2(data) == reference_murmur2(data)


def _cluster(partitions):
    return SimpleNamespace(
        topics=lambda: {"t"},
        partitions_for_topic=lambda topic: set(partitions),
        available_partitions_for_topic=lambda topic: set(partitions),
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(min_value=1, max_value=64))
def test_partition_matches_the_default_partitioner(key, count):
    cluster = _cluster(range(count))
    expected = DefaultPartitioner().partition("t", None, key, None, b"v", cluster)
    assert KeyHashPartitioner().partition("t", None, key, None, b"v", cluster) == expected


def test_known_java_values():
    """Values from the Java client's own tests (Utils.murmur2 of these strings)."""
    assert murmur2(b"21") == (-973932308) & 0xFFFFFFFF
    assert murmur2(b"foobar") == (-790332482) & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-long-string") == (-985981536) & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-longer-string") == (-1486304829) & 0xFFFFFFFF
    assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == (-58897971) & 0xFFFFFFFF
    assert murmur2(bytes([ord("a"), ord("b"), ord("c")])) == 479470107


def test_joined_topics_must_have_one_partition_count():
    check_copartitioned({GENERATIONS: 6, FEEDBACK: 6, DEAD_LETTER: 1})
    check_copartitioned({GENERATIONS: 6})  # a topic not there yet is not compared
    with pytest.raises(
        PartitionMismatch, match=r"rlhf.generations.v1 has 6, rlhf.feedback.v1 has 3"
    ):
        check_copartitioned({GENERATIONS: 6, FEEDBACK: 3})


def test_topic_specs_give_generations_and_feedback_one_count():
    specs = topic_specs(5)
    assert specs[GENERATIONS]["num_partitions"] == specs[FEEDBACK]["num_partitions"] == 5
