"""The built CPU image, run with podman as the chart runs it: user 10001, read-only root
filesystem, no capabilities, writable /tmp and ~/.cache only. Every service of the entrypoint
prints its help; the broker and the topics job start for real and create the topics.

Not collected by `make test` (the file name is not test_*.py): `make deploy-smoke` builds the
image and runs this file, then smoke_pods.py.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator

import pytest
from kafka import KafkaAdminClient

from rlhf import bus
from tests.deploy.chart_support import ROOT
from tests.deploy.smoke.podman import IMAGE, Podman, tcp_open, workdir

# As the chart's securityContext and volumes set them.
AS_THE_CHART_RUNS_IT = (
    "--read-only",
    "--user=10001:10001",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--tmpfs=/tmp",
    "--tmpfs=/home/rlhf/.cache",
)
ENTRYPOINT = (ROOT / "docker" / "entrypoint.sh").read_text()
SERVICES = re.search(r"^\s*([\w| -]+)\)\s*\n\s*shift\s*\n\s*exec \"rlhf-", ENTRYPOINT, re.M)
SERVICES = [name.strip() for name in SERVICES.group(1).split("|")] + ["topics"]


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    folder = workdir()
    podman = Podman(folder)
    assert podman.image_exists(IMAGE), f"{IMAGE} is not built: make images"
    yield podman
    shutil.rmtree(folder, ignore_errors=True)


def run(podman: Podman, *args: str, timeout: float = 120):
    return podman.run(
        "run", "--rm", *AS_THE_CHART_RUNS_IT, IMAGE, *args, check=False, timeout=timeout
    )


def test_image_runs_as_the_charts_user_with_the_entrypoint(podman):
    (info,) = podman.json("image", "inspect", IMAGE)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["rlhf-entrypoint"]
    assert "RLHF_CACHE_DIR=/opt/rlhf/models" in config["Env"]
    assert "HF_HUB_OFFLINE=1" in config["Env"]


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_starts_and_prints_its_help(podman, service):
    result = run(podman, service, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage:" in result.stdout
    if service not in ("topics", "broker"):  # flags; the services are configured by RLHF_*
        assert "RLHF_" in result.stdout, result.stdout


def test_unknown_service_is_refused_with_the_list(podman):
    result = run(podman, "genration")
    assert result.returncode == 64
    assert "unknown service: 'genration'" in result.stderr


def test_converted_models_are_in_the_image_and_load_read_only(podman):
    """The policy SmolLM2 converted at build time loads from the read-only image (no download:
    HF_HUB_OFFLINE), and the reward backbone from its wheel."""
    script = (
        "from rlhf.config import CommonConfig, load_config; from rlhf import models; "
        "c = load_config(CommonConfig).cache_dir; "
        "p = models.load_base_policy('smollm2-135m', c); "
        "r, _ = models.load_reward_backbone('minilm-l6'); "
        "print(type(p).__name__, sum(x.numel() for x in p.parameters()), type(r).__name__)"
    )
    result = podman.run(
        "run", "--rm", *AS_THE_CHART_RUNS_IT, "--entrypoint=python", IMAGE, "-c", script,
        check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    name, parameters, reward = result.stdout.split()
    assert name == "LlamaForCausalLM" and int(parameters) > 100_000_000
    assert reward.endswith("ForSequenceClassification")


@pytest.fixture(scope="module")
def broker(podman) -> Iterator[tuple[str, str]]:
    """The image's broker on a network of its own, as the chart's devBroker runs it: (network,
    address)."""
    with podman.network() as (network, ip, *_):
        name = f"{network}-broker"
        podman.run(
            "run", "--detach", "--name", name, "--network", network, "--ip", ip,
            *AS_THE_CHART_RUNS_IT, IMAGE, "broker", f"--host={ip}", "--port=9092",
            "--partitions=3",
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not tcp_open(ip, 9092) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert tcp_open(ip, 9092), podman.logs(name)
            yield network, ip
        finally:
            podman.run("rm", "--force", "--time=2", name, check=False)


def test_broker_and_topics_job_start_for_real(podman, broker):
    """The topics command (the chart's hook Job) against the image's broker: it creates or
    finds every platform topic; a second run changes nothing and succeeds too."""
    network, ip = broker
    command = (
        "topics", f"--bootstrap={ip}:9092", "--partitions=3", "--replication-factor=1",
        "--timeout=60",
    )  # fmt: skip
    for _ in range(2):
        result = podman.run(
            "run", "--rm", "--network", network, *AS_THE_CHART_RUNS_IT, IMAGE, *command,
            check=False, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    admin = KafkaAdminClient(bootstrap_servers=f"{ip}:9092", request_timeout_ms=10000)
    try:
        topics = set(admin.list_topics())
    finally:
        admin.close()
    assert set(bus.topic_specs(3)) <= topics
