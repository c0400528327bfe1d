"""`make up` as a user runs it: every service as its own process, the loop turning, Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.v1 import generation_pb2, generation_pb2_grpc
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split())


def _served_version(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        return stub.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest(), timeout=5).version


def test_up_runs_the_loop_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = {
        **os.environ,
        "RLHF_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "RLHF_SIM_PAUSE_SECONDS": "0.2",
        "RLHF_SIM_USERS": "2",
    }
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.launcher",
            "--model",
            "tiny-random",
            "--reward-model",
            "tiny-random",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    try:
        for line in launcher.stdout:
            output.append(line)
            if "Ctrl-C stops everything" in line:
                break
        assert launcher.poll() is None, "".join(output)
        addresses = _read_env(tmp_path / "run" / "up.env")
        for name in ("GENERATION", "FEEDBACK", "REWARD", "TRAINER", "REWARD_TRAINER"):
            with grpc.insecure_channel(addresses[f"RLHF_{name}_ADDRESS"]) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        tgi = requests.post(
            addresses["RLHF_TGI_URL"] + "/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}},
            timeout=60,
        )
        assert tgi.status_code == 200
        thumb = requests.post(
            addresses["RLHF_FEEDBACK_URL"],
            json={
                "generationId": tgi.json()["generation_id"],
                "idempotencyKey": "launcher-test",
                "thumb": "THUMB_UP",
            },
            headers={"authorization": f"Bearer {addresses['RLHF_API_KEY']}"},
            timeout=30,
        )
        assert thumb.status_code == 200, thumb.text
        generation = addresses["RLHF_GENERATION_ADDRESS"]
        assert wait_until(lambda: _served_version(generation) >= 2, timeout=240, interval=1), (
            "the served policy version did not increase"
        )
    finally:
        launcher.send_signal(signal.SIGINT)
        started = time.monotonic()
        rest, _ = launcher.communicate(timeout=120)
    output.append(rest)
    assert launcher.returncode == 0, "".join(output)
    assert "stopped cleanly" in rest
    assert time.monotonic() - started < 120
    logs = tmp_path / "run" / "logs"
    for name in ("generation", "feedback", "reward", "trainer"):
        text = (logs / f"{name}.log").read_text()
        assert "received SIGTERM, draining" in text and f"{name} stopped" in text, text[-2000:]
        assert "Traceback" not in text, text[-3000:]
