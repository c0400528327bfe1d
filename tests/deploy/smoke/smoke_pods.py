"""The chart's own manifests, running: the README's single-node `helm install` (values-local.yaml)
rendered by Helm's SDK, started with `podman kube play` from the built image, and driven through
the pods' ports as an app and an operator would: generate -> feedback -> the trainer's status
shows the feedback consumed -> a policy checkpoint is published and the generation pod serves it.

What podman does not do as a cluster would is done by tests/deploy/kube_play.py (Services as host
aliases, probes run from here, ...) and printed at the start of the run.

Not collected by `make test` (the file name is not test_*.py): `make deploy-smoke` runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from kafka import KafkaAdminClient

from rlhf import bus
from rlhf.auth import ClientSecurity, dial
from rlhf.scrape import scrape
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from tests.deploy.chart_support import CHART, Install, merged, readme_local_install, render
from tests.deploy.kube_play import Plan, plan
from tests.deploy.smoke.podman import (
    IMAGE,
    Podman,
    grpc_serving,
    http_ok,
    probe_passes,
    tcp_open,
    wait_for_probes,
    workdir,
)

SMOKE_VALUES = Path(__file__).with_name("values-smoke.yaml")
# How long a pod may take to start here, at most (each probe's own budget may be shorter).
STARTUP_CAP = 420.0
PUBLISH_TIMEOUT = 600.0


def smoke_values(install: Install) -> dict:
    """The README command's values, then values-smoke.yaml, then the image this run built."""
    values = merged(install.values(), yaml.safe_load(SMOKE_VALUES.read_text()))
    repository, tag = IMAGE.rsplit(":", 1)
    return merged(values, {"image": {"repository": repository, "tag": tag}})


@dataclass
class Cluster:
    podman: Podman
    plan: Plan
    install: Install
    values: dict
    api_key: str  # the app's (generate, feedback)
    operator_key: str  # the trainer's control plane, status, /metrics
    workdir: Path
    containers: dict[str, str] = field(default_factory=dict)  # Deployment -> container name
    probe_seconds: dict[str, dict] = field(default_factory=dict)  # kind -> container -> s

    def address(self, service: str, port: str) -> str:
        return self.plan.address(f"{self.install.release}-{service}", port)

    def tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {name} ---\n{self.podman.logs(container, lines)}"
            for name, container in self.containers.items()
        )

    def rlhf(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """The project's CLI against the pods (cwd: no run/up.env to pick up)."""
        addresses = {
            "--generation": self.address("generation", "grpc"),
            "--feedback": self.address("feedback", "grpc"),
            "--trainer": self.address("trainer-ppo", "grpc"),
            "--reward-trainer": self.address("trainer-reward", "grpc"),
        }
        flags = [part for pair in addresses.items() for part in pair]
        # The README's keys, as a person would export them.
        env = {**os.environ, "RLHF_API_KEY": self.api_key, "RLHF_OPERATOR_KEY": self.operator_key}
        return subprocess.run(
            [sys.executable, "-m", "rlhf.cli", *flags, "--timeout", "120", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
            env=env,
        )


def _pod_containers(podman: Podman, deployments: list[str]) -> dict[str, str]:
    """Deployment -> the name of its pod's one container (podman names pods <name>-pod[-0])."""
    found = {}
    for container in podman.json("ps", "--all", "--pod", "--format", "json"):
        pod = container.get("PodName") or ""
        for deployment in deployments:
            if re.fullmatch(rf"{re.escape(deployment)}-pod(-\d+)?", pod) and not container.get(
                "IsInfra"
            ):
                found[deployment] = container["Names"][0]
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    folder = workdir()
    podman = Podman(folder)
    assert podman.image_exists(IMAGE), f"{IMAGE} is not built: make images"
    install = readme_local_install()
    values = smoke_values(install)
    api_key = values["secrets"]["feedbackApiKeys"][0].split("=", 1)[1]
    operator_key = values["secrets"]["operatorKeys"][0].split("=", 1)[1]
    with helm.Chart.load(CHART) as chart:
        docs = render(chart, values, install.release, install.namespace).docs
    with podman.network() as (network, *addresses):
        run_plan = plan(docs, addresses, install.namespace)
        print("\npodman kube play of the chart's manifests:", *run_plan.notes, sep="\n  ")
        manifests = folder / "manifests.yaml"
        manifests.write_text(yaml.safe_dump_all(run_plan.manifests))
        claims = [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"]
        for name, data in run_plan.secrets.items():
            podman.run("secret", "create", name, "-", input=_secret(data))
        cluster = Cluster(podman, run_plan, install, values, api_key, operator_key, folder)
        try:
            ips = [f"--ip={ip}" for ip in run_plan.pods.values()]
            podman.run("kube", "play", f"--network={network}", *ips, str(manifests), timeout=600)
            cluster.containers = _pod_containers(podman, list(run_plan.pods))
            assert set(cluster.containers) == set(run_plan.pods), cluster.containers
            try:
                for kind in ("startup", "readiness"):
                    cluster.probe_seconds[kind] = wait_for_probes(
                        run_plan.probes, run_plan.pods, kind, STARTUP_CAP
                    )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{cluster.tails()}") from exc
            yield cluster
        finally:
            logs = folder / "logs"
            logs.mkdir(exist_ok=True)
            for name, container in cluster.containers.items():
                (logs / f"{name}.log").write_text(podman.logs(container, 100000))
            print(f"\npod logs: {logs}")
            podman.run("kube", "down", str(manifests), check=False, timeout=300)
            for name in claims:
                podman.run("volume", "rm", "--force", name, check=False)
            for name in run_plan.secrets:
                podman.run("secret", "rm", name, check=False)


def _secret(data: dict[str, bytes]) -> bytes:
    from tests.deploy.kube_play import podman_secret

    return podman_secret(data)


def test_pods_start_and_pass_their_probes(cluster):
    """Every pod passed its startup probe, then its readiness probe (the fixture waited for them
    as the kubelet would); now every probe, liveness too, passes."""
    for kind in ("startup", "readiness"):
        expected = {(p.deployment, p.container) for p in cluster.plan.probes if p.kind == kind}
        assert set(cluster.probe_seconds[kind]) == expected
    started, ready = cluster.probe_seconds["startup"], cluster.probe_seconds["readiness"]
    assert {deployment for deployment, _ in ready} == set(cluster.plan.pods)
    print("\nseconds to the startup probe passing, then to ready; restarts:")
    for key in sorted(ready, key=lambda key: started.get(key, 0) + ready[key]):
        (info,) = cluster.podman.json("container", "inspect", cluster.containers[key[0]])
        print(
            f"  {key[0]}: {started.get(key, 0):.0f}s + {ready[key]:.0f}s, "
            f"{info.get('RestartCount', 0)} restarts"
        )
    for probe in cluster.plan.probes:
        assert probe_passes(probe, cluster.plan.pods[probe.deployment]), probe


def test_pods_run_as_the_chart_sets_them(cluster):
    """Non-root (10001), read-only root filesystem, no capabilities, writable scratch only."""
    for deployment, container in cluster.containers.items():
        result = cluster.podman.run(
            "exec", container, "sh", "-c",
            "id -u; id -g; grep CapEff /proc/self/status; touch /probe 2>&1; touch /tmp/probe",
            check=False,
        )  # fmt: skip
        lines = result.stdout.splitlines()
        assert lines[:2] == ["10001", "10001"], (deployment, result.stdout, result.stderr)
        assert lines[2].split() == ["CapEff:", "0000000000000000"], (deployment, lines)
        assert "Read-only file system" in lines[3], (deployment, lines)
        assert result.returncode == 0, (deployment, result.stderr)  # /tmp is writable
        (info,) = cluster.podman.json("container", "inspect", container)
        assert info["HostConfig"]["ReadonlyRootfs"] is True, deployment
        assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"], deployment


def test_every_service_port_answers(cluster):
    """Each Service port reaches its pod and speaks what the chart says: gRPC health on grpc,
    Prometheus metrics on metrics, the HTTP APIs on http, Kafka (with the topics) on kafka."""
    checked = set()
    for endpoint in cluster.plan.endpoints:
        where = f"{endpoint.service}:{endpoint.name} ({endpoint.ip}:{endpoint.port})"
        if endpoint.name == "grpc":
            assert grpc_serving(f"{endpoint.ip}:{endpoint.port}"), where
        elif endpoint.name == "metrics":
            with pytest.raises(urllib.error.HTTPError) as closed:  # closed by default
                scrape(endpoint.port, host=endpoint.ip)
            assert closed.value.code == 401, where
            reader = ClientSecurity(key=cluster.operator_key)
            assert "rlhf_" in scrape(endpoint.port, host=endpoint.ip, security=reader), where
        elif endpoint.name == "kafka":
            admin = KafkaAdminClient(
                bootstrap_servers=f"{endpoint.ip}:{endpoint.port}", request_timeout_ms=10000
            )
            try:
                assert set(bus.topic_specs(1)) <= set(admin.list_topics()), where
            finally:
                admin.close()
        elif endpoint.name == "http" and "generation" in endpoint.service:
            assert http_ok(f"http://{endpoint.ip}:{endpoint.port}/health"), where
        elif endpoint.name == "http" and "feedback" in endpoint.service:
            # No key: refused by the feedback service itself (not a closed port).
            request = urllib.request.Request(
                f"http://{endpoint.ip}:{endpoint.port}/v1/feedback",
                data=b"{}",
                headers={"content-type": "application/json"},
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)  # noqa: S310 - pod address
            assert refused.value.code == 401, where
        else:
            raise AssertionError(f"no check for {where}")
        checked.add((endpoint.service.removeprefix(f"{cluster.install.release}-"), endpoint.name))
    assert checked >= {
        ("broker", "kafka"),
        ("generation", "grpc"),
        ("generation", "http"),
        ("feedback", "grpc"),
        ("feedback", "http"),
        ("reward", "grpc"),
        ("trainer-ppo", "grpc"),
        ("trainer-reward", "grpc"),
    }
    assert tcp_open(*cluster.address("generation", "metrics").split(":"))


def _generate(cluster: Cluster, prompt: str) -> dict:
    result = cluster.rlhf("generate", prompt, "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr + cluster.tails()
    return json.loads(result.stdout)


def _status(cluster: Cluster, stage: str) -> trainer_pb2.TrainerStatus:
    address = cluster.address(f"trainer-{stage}", "grpc")
    with dial(address, ClientSecurity(key=cluster.operator_key)) as channel:
        return trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(
            trainer_pb2.GetStatusRequest(), timeout=30
        )


def _wait(what: str, check, timeout: float, cluster: Cluster, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f}s\n{cluster.tails()}")
        time.sleep(interval)


def test_feedback_becomes_a_policy_the_generation_pod_serves(cluster):
    start = time.monotonic()
    prompts = ["How was your weekend?", "Any tips for a rainy day?", "What should I cook?"]
    answers = [_generate(cluster, prompt) for prompt in prompts]
    for answer in answers:
        assert answer["generationId"], answer
        assert int(answer.get("policyVersion", 0)) == 0, answer
    # Ratings through the CLI (gRPC), and one through the HTTP API of the feedback pod.
    for answer, signal in zip(answers[:2], ("up", "down"), strict=True):
        result = cluster.rlhf(
            "feedback", answer["generationId"], signal, "--api-key", cluster.api_key
        )
        assert result.returncode == 0, result.stderr + cluster.tails()
    request = urllib.request.Request(
        f"http://{cluster.address('feedback', 'http')}/v1/feedback",
        data=json.dumps(
            {
                "generationId": answers[2]["generationId"],
                "idempotencyKey": "smoke-http-1",
                "thumb": "THUMB_UP",
            }
        ).encode(),
        headers={"authorization": f"Bearer {cluster.api_key}", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 - pod address
        assert reply.status == 200

    # Both trainer stages consumed the three ratings (their own consumer groups).
    for stage in ("ppo", "reward"):
        status = _wait(
            f"{stage} trainer consumes the feedback",
            lambda stage=stage: (s := _status(cluster, stage)).feedback_consumed >= 3 and s,
            180,
            cluster,
        )
        assert status.stage == stage
    # PPO trains on the joined prompts (scored through the reward Service) and publishes.
    status = _wait(
        "ppo publishes a policy", lambda: (s := _status(cluster, "ppo")).policy_version >= 1 and s,
        PUBLISH_TIMEOUT, cluster, interval=5,
    )  # fmt: skip
    published = status.policy_version
    assert status.step >= 1 and status.feedback_used >= 2, status

    # The generation pod reloads it from the shared volume and serves it.
    def serves_it() -> dict | None:
        answer = _generate(cluster, prompts[0])
        return answer if int(answer.get("policyVersion", 0)) >= published else None

    served = _wait(f"generation serves v{published}", serves_it, 180, cluster, interval=3)
    assert served["text"] or served.get("generationId")
    # What the operator sees.
    result = cluster.rlhf("checkpoints")
    assert result.returncode == 0 and f"{published}" in result.stdout, result.stdout + result.stderr
    result = cluster.rlhf("status")
    assert result.returncode == 0, result.stderr
    print(f"\ngenerate -> feedback -> v{published} served: {time.monotonic() - start:.0f}s")
    print(result.stdout)
