"""`make up`: start the broker, every service and the simulated users, and watch the loop turn.

Each service runs as its own process, exactly as in a cluster, with its logs in `run/logs/`.
Ctrl-C (or SIGTERM) stops them in reverse order, each draining its in-flight work, then the broker.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf import bus
from rlhf.broker import EmbeddedBroker, free_port
from rlhf.v1 import generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from .addresses import BROKER_PORT, FEEDBACK_HTTP_PORT, HTTP_PORT, PORTS, address_variable

HEALTH_TIMEOUT = 600.0  # the first start converts the base model
# Sized for a 2-core CPU: a PPO update every minute or two on SmolLM2-135M, and users who leave
# the trainer some CPU. Any of these can be overridden from the environment.
CPU_DEMO = {
    "trainer": {
        "RLHF_PPO_BATCH_SIZE": "4",
        "RLHF_PPO_MINIBATCH_SIZE": "4",
        "RLHF_PPO_EPOCHS": "1",
        "RLHF_PPO_RESPONSE_TOKENS": "24",
    },
    "reward-trainer": {
        "RLHF_REWARD_STEPS_PER_ROUND": "40",
        "RLHF_REWARD_ROUND_EXAMPLES": "16",
        "RLHF_REWARD_MIN_HELDOUT": "8",
    },
    "simulated-users": {"RLHF_SIM_PAUSE_SECONDS": "2", "RLHF_SIM_MAX_NEW_TOKENS": "24"},
}


@dataclass
class Process:
    name: str
    module: str
    grpc_port: int | None
    metrics_port: int | None
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    def start(self, log_dir: Path) -> None:
        self.log = open(log_dir / f"{self.name}.log", "ab")  # noqa: SIM115 (closed in stop)
        defaults = CPU_DEMO.get(self.name, {})
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**defaults, **os.environ, **self.env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to the launcher, which stops us in order
        )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.log is not None:
            self.log.close()


def wait_healthy(process: Process, log_dir: Path, timeout: float = HEALTH_TIMEOUT) -> None:
    """Block until the process answers the standard gRPC health check with SERVING."""
    channel = grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}")
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not process.alive():
                tail = (log_dir / f"{process.name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{process.name} exited during start-up:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{process.name} did not become healthy in {timeout:.0f} s")
    finally:
        channel.close()


def _port(preferred: int) -> int:
    with socket.socket() as probe:
        busy = probe.connect_ex(("127.0.0.1", preferred)) == 0
    return free_port() if busy else preferred


def plan(bootstrap: str, model: str, reward_model: str, api_key: str) -> list[Process]:
    """The processes in start order, each with its own ports and settings."""
    id_key = os.environ.get("RLHF_GENERATION_ID_KEY") or secrets.token_hex(32)
    common = {"RLHF_KAFKA_BOOTSTRAP": bootstrap, "RLHF_GRPC_HOST": "127.0.0.1"}
    ports = {
        name: (_port(grpc_port), _port(metrics)) for name, (grpc_port, metrics) in PORTS.items()
    }
    http_port = _port(HTTP_PORT)
    feedback_http_port = _port(FEEDBACK_HTTP_PORT)

    def service(name: str, extra: dict[str, str], module: str | None = None) -> Process:
        grpc_port, metrics_port = ports[name]
        env = {
            **common,
            "RLHF_GRPC_PORT": str(grpc_port),
            "RLHF_METRICS_PORT": str(metrics_port),
            **extra,
        }
        return Process(name, module or f"services.{name}", grpc_port, metrics_port, env)

    return [
        service("reward", {"RLHF_REWARD_MODEL": reward_model}),
        service(
            "generation",
            {
                "RLHF_POLICY_MODEL": model,
                "RLHF_GENERATION_ID_KEY": id_key,
                "RLHF_HTTP_PORT": str(http_port),
            },
        ),
        service(
            "feedback",
            {
                "RLHF_GENERATION_ID_KEY": id_key,
                "RLHF_FEEDBACK_API_KEYS": f"local={api_key}",
                "RLHF_FEEDBACK_HTTP_PORT": str(feedback_http_port),
            },
        ),
        service(
            "trainer",
            {
                "RLHF_POLICY_MODEL": model,
                "RLHF_REWARD_ADDRESS": f"127.0.0.1:{ports['reward'][0]}",
            },
        ),
        service(
            "reward-trainer",
            {"RLHF_TRAINER_STAGE": "reward", "RLHF_REWARD_MODEL": reward_model},
            module="services.trainer",
        ),
        Process(
            "simulated-users",
            "services.simulated_users",
            None,
            None,
            {
                "RLHF_GENERATION_ADDRESS": f"127.0.0.1:{ports['generation'][0]}",
                "RLHF_FEEDBACK_ADDRESS": f"127.0.0.1:{ports['feedback'][0]}",
                "RLHF_SIM_API_KEY": api_key,
            },
        ),
    ]


def write_env(run_dir: Path, bootstrap: str, processes: list[Process], api_key: str) -> Path:
    """Addresses and the API key, for apps and scripts to `source`."""
    lines = [f"RLHF_KAFKA_BOOTSTRAP={bootstrap}", f"RLHF_API_KEY={api_key}"]
    for process in processes:
        if process.grpc_port is not None:
            lines.append(f"{address_variable(process.name)}=127.0.0.1:{process.grpc_port}")
        if "RLHF_HTTP_PORT" in process.env:
            lines.append(f"RLHF_TGI_URL=http://127.0.0.1:{process.env['RLHF_HTTP_PORT']}")
        if "RLHF_FEEDBACK_HTTP_PORT" in process.env:
            port = process.env["RLHF_FEEDBACK_HTTP_PORT"]
            lines.append(f"RLHF_FEEDBACK_URL=http://127.0.0.1:{port}/v1/feedback")
    path = run_dir / "up.env"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def report(processes: list[Process]) -> str:
    """One status line: served policy version and trainer progress."""
    by_name = {p.name: p for p in processes}
    parts = []
    with grpc.insecure_channel(f"127.0.0.1:{by_name['generation'].grpc_port}") as channel:
        info = generation_pb2_grpc.GenerationServiceStub(channel).GetPolicyInfo(
            generation_pb2.GetPolicyInfoRequest(), timeout=5
        )
        parts.append(f"served policy v{info.version}")
    with grpc.insecure_channel(f"127.0.0.1:{by_name['trainer'].grpc_port}") as channel:
        status = trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(
            trainer_pb2.GetStatusRequest(), timeout=5
        )
        parts.append(
            f"trainer step {status.step} (published v{status.policy_version}, "
            f"reward {status.mean_reward:+.3f}, kl {status.kl:.3f}, "
            f"feedback {status.feedback_consumed}, waiting prompts {status.pending_prompts})"
        )
    with grpc.insecure_channel(f"127.0.0.1:{by_name['reward-trainer'].grpc_port}") as channel:
        status = trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(
            trainer_pb2.GetStatusRequest(), timeout=5
        )
        parts.append(f"reward model v{status.reward_version}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--broker-port", type=int, default=int(os.environ.get("RLHF_UP_BROKER_PORT", BROKER_PORT))
    )
    parser.add_argument("--model", default=os.environ.get("RLHF_POLICY_MODEL", "smollm2-135m"))
    parser.add_argument("--reward-model", default=os.environ.get("RLHF_REWARD_MODEL", "minilm-l6"))
    parser.add_argument("--run-dir", type=Path, default=Path("run"))
    args = parser.parse_args(argv)
    log_dir = args.run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    broker = EmbeddedBroker(port=_port(args.broker_port), log_path=log_dir / "broker.log")
    broker.start()
    bus.ensure_topics(broker.bootstrap)
    print(f"broker        kafka://{broker.bootstrap}  (topics: {', '.join(bus.ALL_TOPICS)})")
    api_key = os.environ.get("RLHF_UP_API_KEY") or secrets.token_hex(16)
    processes = plan(broker.bootstrap, args.model, args.reward_model, api_key)
    try:
        for process in processes:
            process.start(log_dir)
            if process.grpc_port is not None:
                wait_healthy(process, log_dir)
                print(
                    f"{process.name:<13} grpc://127.0.0.1:{process.grpc_port}  "
                    f"metrics http://127.0.0.1:{process.metrics_port}/metrics"
                )
                if "RLHF_HTTP_PORT" in process.env:
                    http = process.env["RLHF_HTTP_PORT"]
                    print(f"{'':<13} TGI-compatible HTTP API http://127.0.0.1:{http}/")
                if "RLHF_FEEDBACK_HTTP_PORT" in process.env:
                    http = process.env["RLHF_FEEDBACK_HTTP_PORT"]
                    print(f"{'':<13} HTTP JSON API http://127.0.0.1:{http}/v1/feedback")
            else:
                print(f"{process.name:<13} running")
            if stop.is_set():
                break
        env_file = write_env(args.run_dir, broker.bootstrap, processes, api_key)
        print(f"feedback API key: tenant 'local', key {api_key} (all addresses in {env_file})")
        print(f"logs in {log_dir}/ ; Ctrl-C stops everything")
        while not stop.wait(15.0):
            dead = [p.name for p in processes if not p.alive()]
            if dead:
                print(f"stopped unexpectedly: {', '.join(dead)} (see {log_dir}/)")
                break
            try:
                print(time.strftime("%H:%M:%S"), report(processes), flush=True)
            except grpc.RpcError as exc:
                print(time.strftime("%H:%M:%S"), f"status unavailable: {exc.code().name}")
    finally:
        print("stopping ...", flush=True)
        for process in reversed(processes):
            process.stop()
        broker.stop()
        print("stopped cleanly")


if __name__ == "__main__":
    main()
