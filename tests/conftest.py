"""Shared fixtures: a real embedded broker, real in-process gRPC servers, test keys."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rlhf import bus
from rlhf.broker import EmbeddedBroker
from rlhf.checkpoints import REWARD, CheckpointStore
from rlhf.config import CommonConfig, load_config
from rlhf.models import TINY, load_reward_backbone, reward_checkpoint_files
from rlhf.scrape import scrape as scrape_port
from rlhf.server import RunningServer, Service
from services.generation.config import GenerationConfig
from services.trainer.config import TrainerConfig
from services.trainer.stage import announce

ID_KEY = "test-generation-id-key-0123456789"
API_KEY = "test-api-key-0123456789"
TENANT = "tests"
AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One real Kafka-compatible broker (Tansu) for the whole session, topics created."""
    with EmbeddedBroker() as running:
        bus.ensure_topics(running.bootstrap)
        yield running


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of the test's own, for tests that count every event on the topics (the
    session broker carries other tests' generations and feedback)."""
    with EmbeddedBroker() as running:
        bus.ensure_topics(running.bootstrap)
        yield running


@pytest.fixture(scope="session")
def cache_dir():
    return load_config(CommonConfig).cache_dir


def tiny_generation_config(
    broker: EmbeddedBroker, checkpoint_dir, cache_dir, **overrides
) -> GenerationConfig:
    """A generation service on the tiny model with the test id key, on loopback."""
    values = {
        "kafka_bootstrap": broker.bootstrap,
        "checkpoint_dir": checkpoint_dir,
        "cache_dir": cache_dir,
        "policy_model": TINY,
        "generation_id_key": ID_KEY,
        "grpc_host": "127.0.0.1",
        "http_port": 0,
    }
    return GenerationConfig(**{**values, **overrides})


def trainer_config(fields: dict[str, Any], **env: object) -> TrainerConfig:
    """A trainer stage's config the way a deployment sets it: environment variables (`env`,
    e.g. RLHF_PPO_BATCH_SIZE=16, parsed and validated), then top-level fields such as the
    broker and the checkpoint store (`fields`)."""
    config = load_config(TrainerConfig, {name: str(value) for name, value in env.items()})
    return dataclasses.replace(config, **fields)


def publish_reward_model(bootstrap: str, checkpoint_dir: Path) -> int:
    """Write the tiny reward model to the store as the next reward version and announce it, as
    the reward stage publishes one; returns its version. Its scores mean nothing: tests of the
    loop's plumbing need a published reward model (PPO waits for one), not a good one."""
    store = CheckpointStore(checkpoint_dir)
    manifest = store.write(REWARD, *reward_checkpoint_files(load_reward_backbone(TINY)[0]))
    with bus.Publisher(bootstrap, client_id="test-reward-model") as publisher:
        assert announce(publisher, manifest)
    return manifest.version


def serve(service: Service) -> RunningServer:
    """Start `service` on a free loopback port with its own /metrics port."""
    return RunningServer(service, host="127.0.0.1", port=0, metrics_port=0, grace_seconds=2).start()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def scrape(server: RunningServer) -> str:
    """The server's /metrics page."""
    return scrape_port(server.metrics_port)


def consume_all(bootstrap: str, topic: str, message_type, timeout: float = 10.0) -> list:
    """Every record on `topic` right now (no consumer group), for assertions."""
    consumer = bus.EventConsumer(bootstrap, {topic: message_type}, group_id=None)
    records, idle_since = [], time.monotonic()
    try:
        while time.monotonic() - idle_since < 1.5 and time.monotonic() - idle_since < timeout:
            batch = consumer.poll(timeout=0.5)
            if batch:
                records.extend(batch)
                idle_since = time.monotonic()
    finally:
        consumer.close()
    return records
