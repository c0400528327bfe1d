"""Shared fixtures: a real embedded broker, real in-process gRPC servers, test keys.

Every test server accepts the same keys, one per role (`rlhf.auth`): the app key of tenant
TENANT (API_KEY), a service key, an operator key and a reader key. Tests present them through
`channel(server, key)` (gRPC), `scrape(server)` (/metrics, with the reader key) and, for
services run as processes, `KEYS_ENV` (`tests/processes.py` adds it)."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf import bus
from rlhf.auth import OPERATOR, READER, SERVICE, ClientSecurity, Credentials, dial
from rlhf.broker import EmbeddedBroker
from rlhf.checkpoints import REWARD, CheckpointStore
from rlhf.config import CommonConfig, load_config
from rlhf.models import TINY, load_reward_backbone, reward_checkpoint_files
from rlhf.scrape import scrape as scrape_port
from rlhf.server import RunningServer, Service
from rlhf.v1 import events_pb2
from services.generation.config import GenerationConfig
from services.trainer.config import TrainerConfig
from services.trainer.stage import announce

ID_KEY = "test-generation-id-key-0123456789"
API_KEY = "test-api-key-0123456789"
TENANT = "tests"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
SERVICE_KEY = "test-service-key-0123456789"
OPERATOR_KEY = "test-operator-key-0123456789"
READER_KEY = "test-reader-key-0123456789"
SERVICE_AUTH = (("authorization", f"Bearer {SERVICE_KEY}"),)
OPERATOR_AUTH = (("authorization", f"Bearer {OPERATOR_KEY}"),)
READER_AUTH = (("authorization", f"Bearer {READER_KEY}"),)
# What every test server accepts besides its own apps' keys, and the same as settings.
CREDENTIALS = (
    Credentials.parse(SERVICE, [f"tests={SERVICE_KEY}"])
    | Credentials.parse(OPERATOR, [f"tests={OPERATOR_KEY}"])
    | Credentials.parse(READER, [f"tests={READER_KEY}"])
)
KEYS_ENV = {
    "RLHF_SERVICE_KEYS": f"tests={SERVICE_KEY}",
    "RLHF_OPERATOR_KEYS": f"tests={OPERATOR_KEY}",
    "RLHF_READER_KEYS": f"tests={READER_KEY}",
    "RLHF_CLIENT_KEY": SERVICE_KEY,  # what a trainer presents to reward and generation
}


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
        "api_keys": (f"{TENANT}={API_KEY}",),
        "grpc_host": "127.0.0.1",
        "http_port": 0,
    }
    return GenerationConfig(**{**values, **overrides})


def trainer_config(fields: dict[str, Any], **env: object) -> TrainerConfig:
    """A trainer stage's config the way a deployment sets it: environment variables (`env`,
    e.g. RLHF_PPO_BATCH_SIZE=16, parsed and validated, and the test keys: it presents the
    service key), then top-level fields such as the broker and the checkpoint store
    (`fields`)."""
    environ = {**KEYS_ENV, **{name: str(value) for name, value in env.items()}}
    config = load_config(TrainerConfig, environ)
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


def publish_events(
    bootstrap: str, events: Iterable[events_pb2.GenerationEvent | events_pb2.FeedbackEvent]
) -> None:
    """Publish generation and feedback events as the services would, keyed by generation id,
    and wait until the broker has every one."""
    with bus.Publisher(bootstrap, client_id="test-users") as publisher:
        futures = []
        for event in events:
            if isinstance(event, events_pb2.GenerationEvent):
                topic, key = bus.GENERATIONS, event.generation_id
            else:
                topic, key = bus.FEEDBACK, event.feedback.generation_id
            futures.append(publisher.publish_async(topic, key, event))
        publisher.flush()
        for future in futures:
            future.get(timeout=10)


def serve(service: Service) -> RunningServer:
    """Start `service` on a free loopback port with its own /metrics port, accepting the test
    keys (CREDENTIALS) besides the service's own apps' keys."""
    return RunningServer(
        service,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        grace_seconds=2,
        credentials=CREDENTIALS,
    ).start()


def channel(server: RunningServer | int, key: str = "") -> grpc.Channel:
    """A channel to a test server (or a port on loopback) presenting `key` on every call."""
    port = server if isinstance(server, int) else server.port
    return dial(f"127.0.0.1:{port}", ClientSecurity(key=key))


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# The key a test presents to each kind of service: apps generate, operators steer trainers,
# readers ask the reward service what it serves; feedback calls carry their tenant's key.
KEY_FOR = {
    "generation": API_KEY,
    "feedback": "",
    "reward": READER_KEY,
    "trainer": OPERATOR_KEY,
    "reward-trainer": OPERATOR_KEY,
    "release-trainer": OPERATOR_KEY,
    "sft": OPERATOR_KEY,
}


def channels_to(servers: dict[str, RunningServer]) -> dict[str, grpc.Channel]:
    """A channel to each named test server, presenting the key its kind takes (KEY_FOR)."""
    return {name: channel(server, KEY_FOR.get(name, "")) for name, server in servers.items()}


def scrape(server: RunningServer) -> str:
    """The server's /metrics page (read with the reader key)."""
    return scrape_port(server.metrics_port, security=ClientSecurity(key=READER_KEY))


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


def released(bootstrap: str) -> list[tuple[int, int, str]]:
    """Every release on the releases topic: (incumbent, candidate, reason)."""
    return [
        (r.message.incumbent_version, r.message.candidate_version, r.message.reason)
        for r in consume_all(bootstrap, bus.RELEASES, events_pb2.ReleaseEvent)
    ]


def _openssl(*argv: str) -> None:
    subprocess.run(["openssl", *argv], check=True, capture_output=True)


def _authority(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(folder: Path, name: str, authority: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 usable as server and as client."""
    cert, key, request = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(authority[0]), "-CAkey",
        str(authority[1]), "-CAcreateserial", "-days", "1", "-out", str(cert),
        "-extfile", str(extensions),
    )  # fmt: skip
    return cert, key


@dataclasses.dataclass(frozen=True)
class Pki:
    """A test CA, a service certificate it signed (server and client), and a certificate
    signed by another CA (a stranger's)."""

    ca: Path
    cert: Path
    key: Path
    stranger_cert: Path
    stranger_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """Certificates made with the openssl CLI (the venv has no `cryptography`)."""
    folder = tmp_path_factory.mktemp("pki")
    authority = _authority(folder, "test-ca")
    cert, key = _leaf(folder, "service", authority)
    stranger = _leaf(folder, "stranger", _authority(folder, "other-ca"))
    return Pki(authority[0], cert, key, *stranger)


def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    """A random two-layer Llama over a 64-token vocabulary, in eval mode (`config` overrides)."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()
