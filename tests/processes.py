"""Services as real processes (`python -m services.<name>`), for tests that kill them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import KEYS_ENV


def start_service(
    module: str, env: dict[str, str], port: int, log_path: Path, timeout: float = 60.0
) -> subprocess.Popen:
    """Start `python -m <module>` with `env` added (and the test keys), logging to `log_path`;
    returns once its gRPC health check on `port` says SERVING."""
    full_env = {
        **os.environ,
        "RLHF_GRPC_HOST": "127.0.0.1",
        "RLHF_GRPC_PORT": str(port),
        "RLHF_METRICS_PORT": "0",
        **KEYS_ENV,
        **env,
    }
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module], env=full_env, stdout=log, stderr=log
        )
    wait_healthy(port, process, timeout)
    return process


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{process.args} exited during start-up"
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"{process.args} did not become healthy in {timeout} s")
