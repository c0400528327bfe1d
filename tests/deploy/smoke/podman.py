"""podman for the deploy smoke run: the built image, a network of the run's own, and the checks
a kubelet makes (probes), run from this machine against the pods' addresses."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.chart_support import ROOT
from tests.deploy.kube_play import Probe

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# `make deploy-smoke` passes the image it built, and what its podman runs need here (runc when
# installed, the host's limits): see the Makefile.
IMAGE = os.environ.get("RLHF_SMOKE_IMAGE", f"localhost/rlhf-platform:{VERSION}")


class PodmanError(AssertionError):
    pass


class Podman:
    """The podman command with the Makefile's runtime and limits (a containers.conf of the run's
    own: `podman kube play` has no --ulimit flag)."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("podman") is None:
            raise PodmanError(
                "podman is not installed: apt-get install podman (see docker/README.md)"
            )
        self.env = dict(os.environ)
        lines = []
        ulimits = os.environ.get("RLHF_PODMAN_ULIMITS", "").split()
        if ulimits:
            lines += ["[containers]", f"default_ulimits = {json.dumps(ulimits)}"]
        runtime = os.environ.get("RLHF_PODMAN_RUNTIME", "")
        if runtime:
            lines += ["[engine]", f"runtime = {json.dumps(runtime)}"]
        if lines:
            conf = workdir / "containers.conf"
            conf.write_text("\n".join(lines) + "\n")
            self.env["CONTAINERS_CONF"] = str(conf)

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=input is None,
            input=input,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args)} exited {result.returncode}:\n{_text(result.stderr)}"
            )
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args).stdout)

    def image_exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    @contextmanager
    def network(self) -> Iterator[list[str]]:
        """A bridge network of this run's own (podman picks a free subnet); yields addresses
        for pods, from .10 on."""
        name = f"rlhf-smoke-{uuid.uuid4().hex[:8]}"
        self.run("network", "create", name)
        try:
            (info,) = self.json("network", "inspect", name)
            subnet = ipaddress.ip_network(info["subnets"][0]["subnet"])
            hosts = [str(h) for h in subnet.hosts()][9:40]
            yield [name, *hosts]
        finally:
            self.run("network", "rm", "--force", name, check=False)

    def logs(self, container: str, tail: int = 60) -> str:
        result = self.run("logs", "--tail", str(tail), container, check=False)
        return _text(result.stdout) + _text(result.stderr)


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="rlhf-deploy-smoke-"))


# -- what a kubelet checks -----------------------------------------------------------------------


def grpc_serving(address: str, timeout: float = 5.0, service: str = "") -> bool:
    """grpc.health.v1 Check: SERVING (what Kubernetes' gRPC probe asks)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def tcp_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - pod address
            return 200 <= reply.status < 400
    except OSError:
        return False


def probe_passes(probe: Probe, ip: str) -> bool:
    if probe.action == "grpc":
        return grpc_serving(f"{ip}:{probe.port}", probe.timeout, probe.path)
    if probe.action == "tcp":
        return tcp_open(ip, probe.port, probe.timeout)
    return http_ok(f"http://{ip}:{probe.port}{probe.path}", probe.timeout)


def wait_for_probes(
    probes: Sequence[Probe], pods: dict[str, str], kind: str, cap: float
) -> dict[tuple[str, str], float]:
    """Run every probe of `kind` (startup, readiness) each period until it passes, as the
    kubelet does; fail once one has failed for its budget (failureThreshold x period: the
    kubelet would restart the container, or keep it out of its Services), or for `cap` seconds,
    whichever comes first. Returns the seconds each took."""
    start = time.monotonic()
    waiting = {(p.deployment, p.container): p for p in probes if p.kind == kind}
    next_try = {key: start + p.initial_delay for key, p in waiting.items()}
    took: dict[tuple[str, str], float] = {}
    while waiting:
        now = time.monotonic()
        for key, probe in list(waiting.items()):
            if now < next_try[key]:
                continue
            if probe_passes(probe, pods[probe.deployment]):
                took[key] = time.monotonic() - start
                del waiting[key]
            elif time.monotonic() - start > min(probe.budget, cap):
                raise PodmanError(
                    f"{probe.kind} probe of {probe.deployment} ({probe.action} on port "
                    f"{probe.port}) still failing after {time.monotonic() - start:.0f}s"
                )
            else:
                next_try[key] = now + probe.period
        time.sleep(0.2)
    return took
