"""`python -m rlhf.topics_cli`: create the platform's Kafka topics on a real cluster.

`bus.ensure_topics` is made for the embedded single-node broker (replication factor 1, the broker's
default retention). A production cluster needs a replication factor, retention and
`min.insync.replicas` chosen by its operator: the Helm chart runs this module as a hook Job before
the services start (they refuse to run on missing topics).

Which topics exist and which of them get a single partition (the checkpoint topics, totally
ordered and kept forever) stays decided in `rlhf.bus`. Existing topics are never changed: adding
partitions would move keys to other partitions and break the generation/feedback join, so a
partition count that differs from the request is reported instead. The generations and feedback
topics must have the same partition count (a generation and its feedback share a partition);
if they do not, the command fails.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from rlhf import bus

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
# Topics whose retention the operator chooses; the checkpoint topics keep bus's "forever".
_EVENT_TOPICS = (bus.GENERATIONS, bus.FEEDBACK)


class TopicsError(Exception):
    """The topics could not be created, or exist in a shape the platform cannot use."""


def topic_specs(
    partitions: int,
    replication_factor: int,
    retention_ms: int | None = None,
    dead_letter_retention_ms: int | None = None,
    min_insync_replicas: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The CreateTopics request body: bus's topics and partitioning, the operator's durability."""
    if partitions < 1 or replication_factor < 1:
        raise ValueError("partitions and replication factor must be at least 1")
    if min_insync_replicas is not None and not 1 <= min_insync_replicas <= replication_factor:
        raise ValueError("min.insync.replicas must be between 1 and the replication factor")
    specs = bus.topic_specs(partitions)
    for topic, spec in specs.items():
        spec["replication_factor"] = replication_factor
        configs: dict[str, str] = spec["configs"]
        if topic in _EVENT_TOPICS and retention_ms is not None:
            configs["retention.ms"] = str(retention_ms)
        if topic == bus.DEAD_LETTER and dead_letter_retention_ms is not None:
            configs["retention.ms"] = str(dead_letter_retention_ms)
        if min_insync_replicas is not None:
            configs["min.insync.replicas"] = str(min_insync_replicas)
    return specs


def check_partitions(found: dict[str, int], specs: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings for topics whose partition count differs from the request; raises TopicsError
    when generations and feedback differ from each other (their join would break)."""
    if found.get(bus.GENERATIONS) != found.get(bus.FEEDBACK):
        raise TopicsError(
            f"{bus.GENERATIONS} has {found.get(bus.GENERATIONS)} partitions but {bus.FEEDBACK} "
            f"has {found.get(bus.FEEDBACK)}: they must match, or feedback lands in another "
            "partition than the generation it rates"
        )
    return [
        f"{topic} exists with {found[topic]} partitions (requested {spec['num_partitions']}); "
        "left unchanged"
        for topic, spec in specs.items()
        if topic in found and found[topic] != spec["num_partitions"]
    ]


def _partition_counts(admin: KafkaAdminClient, topics: Sequence[str]) -> dict[str, int]:
    counts = {}
    for topic in admin.describe_topics(list(topics)):
        name = topic.get("topic", topic.get("name"))
        if topic.get("error_code", 0) == 0 and topic.get("partitions"):
            counts[name] = len(topic["partitions"])
    return counts


def create_topics(
    bootstrap: str, specs: dict[str, dict[str, Any]], timeout: float = 120.0
) -> dict[str, int]:
    """Create missing topics, retrying until `timeout` while the cluster is unreachable.

    Returns the partition count of every platform topic. A topic the broker refuses to create
    (e.g. a replication factor above the number of brokers) fails at once with its reason.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining_ms = max(1000, int(min(deadline - time.monotonic(), 15.0) * 1000))
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap,
                client_id="rlhf-topics",
                bootstrap_timeout_ms=remaining_ms,
                request_timeout_ms=remaining_ms,
                **bus.client_options(),
            )
        except (KafkaError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise TopicsError(f"Kafka at {bootstrap} unreachable: {exc}") from exc
            log.info("Kafka at %s not reachable yet (%s); retrying", bootstrap, exc)
            time.sleep(2.0)
            continue
        try:
            result = admin.create_topics(specs, timeout_ms=remaining_ms, raise_errors=False)
            failed = [
                f"{t['name']}: error {t['error_code']} {t.get('error_message') or ''}".strip()
                for t in result["topics"]
                if t["error_code"] not in (0, _TOPIC_ALREADY_EXISTS)
            ]
            if failed:
                raise TopicsError("Kafka refused to create topics: " + "; ".join(failed))
            for t in result["topics"]:
                verb = "created" if t["error_code"] == 0 else "already exists"
                log.info("%s: %s", t["name"], verb)
            counts = _partition_counts(admin, list(specs))
            missing = sorted(set(specs) - set(counts))
            if missing:
                raise TopicsError(f"Topics not visible after creation: {missing}")
            return counts
        except KafkaError as exc:
            if time.monotonic() >= deadline:
                raise TopicsError(f"Creating topics on {bootstrap} failed: {exc}") from exc
            log.info("creating topics failed (%s); retrying", exc)
            time.sleep(2.0)
        finally:
            with contextlib.suppress(Exception):
                admin.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf.topics_cli",
        description="Create the platform's Kafka topics (existing topics are left unchanged).",
    )
    parser.add_argument(
        "--bootstrap",
        default=None,
        help="Kafka bootstrap servers (default: RLHF_KAFKA_BOOTSTRAP, as the services read it)",
    )
    parser.add_argument("--partitions", type=int, default=6, help="partitions of event topics")
    parser.add_argument("--replication-factor", type=int, default=3)
    parser.add_argument(
        "--retention-ms", type=int, default=None, help="generations and feedback retention"
    )
    parser.add_argument("--dead-letter-retention-ms", type=int, default=None)
    parser.add_argument("--min-insync-replicas", type=int, default=None)
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the cluster"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s topics %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # our own lines say what failed
    from rlhf.config import KafkaSettings, load_config

    try:
        bus.configure(load_config(KafkaSettings))  # the cluster's TLS and SASL settings
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    bootstrap = args.bootstrap
    if bootstrap is None:
        from rlhf.config import CommonConfig

        bootstrap = load_config(CommonConfig).kafka_bootstrap
    try:
        specs = topic_specs(
            args.partitions,
            args.replication_factor,
            args.retention_ms,
            args.dead_letter_retention_ms,
            args.min_insync_replicas,
        )
        counts = create_topics(bootstrap, specs, timeout=args.timeout)
        for warning in check_partitions(counts, specs):
            log.warning("%s", warning)
    except (TopicsError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    log.info("topics ready on %s: %s", bootstrap, ", ".join(f"{t}={n}" for t, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
