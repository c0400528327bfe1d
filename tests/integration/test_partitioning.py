"""Generation and feedback consumers scale by partitions: several members of one consumer group,
each with its own join state, join every feedback event exactly once across rebalances.

Everything is real: the Tansu broker, the platform's Publisher with the platform's keys
(`rlhf.ids.partition_key`), EventConsumer in a group, and GroupJoin committing exactly what it
joined after it was recorded (the trainer's rule: commit only what is done).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from kafka import KafkaAdminClient

from rlhf import bus
from rlhf.broker import EmbeddedBroker
from rlhf.ids import GenerationIdSigner, partition_key, prompt_digest
from rlhf.joining import GroupJoin
from rlhf.v1 import events_pb2

PARTITIONS = 4
# Tansu holds JoinGroup for the rebalance timeout (= max_poll_interval_ms): keep it short.
GROUP_SETTINGS = {"max_poll_interval_ms": 1000, "session_timeout_ms": 6000}
# (prompts, first prompt number) of the four workloads the test publishes.
PLAN = ((40, 0), (40, 40), (12, 80), (40, 100))
SIGNER = GenerationIdSigner(b"partitioning-test-key-0123456789")


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as embedded:
        yield embedded


def make_topics(bootstrap: str, partitions: int = PARTITIONS) -> tuple[str, str]:
    """A fresh generations/feedback pair, so the test never sees other tests' records."""
    suffix = uuid.uuid4().hex[:10]
    names = (f"test.generations.{suffix}", f"test.feedback.{suffix}")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1} for name in names}
        )
    finally:
        admin.close()
    return names


@dataclass
class Workload:
    """Generations of a few prompts each (1 to 3 answers), a thumb on every answer and a ranking
    over the answers of every prompt that has two or more."""

    generations: list[events_pb2.GenerationEvent] = field(default_factory=list)
    feedback: list[events_pb2.FeedbackEvent] = field(default_factory=list)

    @classmethod
    def build(cls, prompts: int, start: int = 0) -> Workload:
        work = cls()
        for n in range(start, start + prompts):
            prompt = f"prompt number {n}: say something kind"
            ids = [
                SIGNER.issue(policy_version=1, prompt_hash=prompt_digest(prompt))
                for _ in range(1 + n % 3)
            ]
            for i, gid in enumerate(ids):
                work.generations.append(
                    events_pb2.GenerationEvent(
                        generation_id=gid, prompt=prompt, response=f"answer {i}"
                    )
                )
                work.feedback.append(
                    _feedback(events_pb2.Feedback(generation_id=gid, thumb=events_pb2.THUMB_UP))
                )
            if len(ids) > 1:
                ranking = events_pb2.Ranking(generation_ids=list(reversed(ids)))
                work.feedback.append(
                    _feedback(events_pb2.Feedback(generation_id=ids[-1], ranking=ranking))
                )
        return work


def _feedback(feedback: events_pb2.Feedback) -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(event_id=uuid.uuid4().hex, tenant="tests", feedback=feedback)


def publish(
    publisher: bus.Publisher,
    topics: tuple[str, str],
    work: Workload,
    generations: bool = True,
    feedback: bool = True,
) -> dict[str, int]:
    """Publish keyed by partition_key, generations first as the services do (an id exists only
    once its event is stored); returns the partition of every generation id and event id."""
    generations_topic, feedback_topic = topics
    placed: dict[str, int] = {}
    for event in work.generations if generations else []:
        key = partition_key(event.generation_id)
        placed[event.generation_id], _ = publisher.publish(generations_topic, key, event)
    for event in work.feedback if feedback else []:
        key = partition_key(event.feedback.generation_id)
        placed[event.event_id], _ = publisher.publish(feedback_topic, key, event)
    return placed


class Member:
    """One group member in its own thread: poll, record what joined, then commit it."""

    def __init__(self, name: str, bootstrap: str, topics: tuple[str, str], group: str) -> None:
        generations_topic, feedback_topic = topics
        consumer = bus.EventConsumer(
            bootstrap,
            {
                generations_topic: events_pb2.GenerationEvent,
                feedback_topic: events_pb2.FeedbackEvent,
            },
            group_id=group,
            client_id=name,
            **GROUP_SETTINGS,
        )
        self.name = name
        # Feedback in this test waits for seconds on purpose: never give up on it.
        self.join = GroupJoin(consumer, generations_topic, feedback_topic, give_up_after=600)
        self.joined: list[str] = []  # feedback event ids, in the order this member joined them
        self.whole_rankings: list[bool] = []
        self.owned: set[int] = set()  # every partition number this member was ever assigned
        self.split_assignments: list[set[tuple[str, int]]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consumer = self.join.consumer
        try:
            while not self._stop.is_set():
                for joined in self.join.poll(timeout=0.2):
                    ranking = joined.feedback.feedback.ranking.generation_ids
                    if ranking:
                        self.whole_rankings.append(self._holds_all(list(ranking)))
                    self.joined.append(joined.feedback.event_id)
                # What was joined is recorded (our "durable"): only now commit past it.
                self.join.commit()
                assigned = consumer.assignment()
                by_topic = {t: {p for tt, p in assigned if tt == t} for t in consumer.topics}
                if len({frozenset(ps) for ps in by_topic.values()}) > 1:
                    self.split_assignments.append(assigned)
                self.owned |= {p for _, p in assigned}
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.errors.append(exc)
        finally:
            consumer.close()

    def _holds_all(self, generation_ids: list[str]) -> bool:
        """Whether one partition's join state of this member knows every ranked generation."""
        return any(
            all(join.generation(gid) is not None for gid in generation_ids)
            for join in self.join.joins().values()
        )

    def stop(self) -> None:
        """Leave the group the way a service shuts down: after its last commit."""
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), f"{self.name} did not stop"


def waiting(members: list[Member]) -> int:
    """Feedback events the members hold back, waiting for a generation."""
    return sum(join.waiting for m in members for join in m.join.joins().values())


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_group_members_join_every_feedback_once_across_rebalances(
    broker: EmbeddedBroker,
) -> None:
    topics = make_topics(broker.bootstrap)
    group = f"join-{uuid.uuid4().hex[:8]}"
    first, late, behind, last = (Workload.build(n, start) for n, start in PLAN)
    batches = [first, late, behind, last]
    expected = [event.event_id for work in batches for event in work.feedback]
    rankings = sum(1 for work in batches for e in work.feedback if e.feedback.HasField("ranking"))
    members: list[Member] = []

    def joined() -> Counter[str]:
        return Counter(event_id for member in members for event_id in member.joined)

    with bus.Publisher(broker.bootstrap, client_id="test-partitioning") as publisher:
        placed = publish(publisher, topics, first)
        members += [Member(f"m{i}", broker.bootstrap, topics, group) for i in range(2)]
        wait_for(lambda: len(joined()) > 0, 60, "the first joins")

        # Feedback ahead of its generation (the order of two fetches can do that, and so can a
        # bulk import): it waits, and so does the feedback behind it in its partition...
        placed |= publish(publisher, topics, late, generations=False)
        placed |= publish(publisher, topics, behind)
        wait_for(lambda: waiting(members) > len(late.feedback), 60, "feedback to wait")

        # ... when a third member joins: every member gives up its partitions, waiting feedback
        # included, and the next owners must join it exactly once when the generations come.
        members.append(Member("m2", broker.bootstrap, topics, group))
        wait_for(lambda: members[2].owned, 60, "the third member's assignment")
        placed |= publish(publisher, topics, late, feedback=False)

        # One member leaves (shutdown after its last commit): its partitions move to the others.
        members[0].stop()
        placed |= publish(publisher, topics, last)
        wait_for(lambda: set(joined()) >= set(expected), 90, "every feedback event to join")
        time.sleep(1.5)  # a repeat would show up in a few more polls
        for member in members[1:]:
            member.stop()

    for member in members:
        assert not member.errors, f"{member.name}: {member.errors!r}"
    counts = joined()
    assert len(expected) == len(set(expected)) > 200
    assert set(counts) == set(expected), "a feedback event was missed"
    assert [e for e, n in counts.items() if n > 1] == [], "a feedback event was joined twice"

    # Keys: every answer to one prompt, its feedback and rankings over it share a partition.
    for work in batches:
        for event in work.feedback:
            ids = [event.feedback.generation_id, *event.feedback.ranking.generation_ids]
            assert {placed[gid] for gid in ids} == {placed[event.event_id]}
    assert len(set(placed.values())) == PARTITIONS  # and the prompts spread over all partitions

    # Each ranking was joined by a member that held all the generations it orders.
    whole = [flag for member in members for flag in member.whole_rankings]
    assert len(whole) == rankings and all(whole)

    # The rebalances really moved partitions, and range assignment never split a partition
    # number across the two topics.
    assert all(member.owned for member in members)
    moved = [p for p in range(PARTITIONS) if sum(p in m.owned for m in members) > 1]
    assert moved, "no partition changed owner"
    assert all(not member.split_assignments for member in members)
    assert sum(len(member.joined) for member in members[1:]) > 0
    for member in members:
        for join in member.join.joins().values():
            assert join.given_up == 0 and join.duplicates == 0
