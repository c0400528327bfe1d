"""The shared server bootstrap: SIGTERM-style stop drains in-flight calls; every entry point
documents its settings in --help."""

import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.server import RunningServer

SLOW = "/test.Slow/Call"


class SlowService:
    """A raw gRPC method that takes a while, to have work in flight during shutdown."""

    name = "slow"

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.entered = threading.Event()

    def register(self, server):
        def call(request: bytes, context) -> bytes:
            self.entered.set()
            time.sleep(1.0)
            return b"done:" + request

        handler = grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=None, response_serializer=None
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Slow", {"Call": handler})]
        )
        return ["test.Slow"]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped.set()


def test_stop_finishes_in_flight_calls_then_refuses_new_ones():
    service = SlowService()
    server = RunningServer(service, host="127.0.0.1", port=0, metrics_port=None, grace_seconds=5)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    call = channel.unary_unary(SLOW)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    result = {}
    caller = threading.Thread(target=lambda: result.setdefault("reply", call(b"x", timeout=10)))
    caller.start()
    assert service.entered.wait(5)
    server.stop()
    caller.join()
    assert result["reply"] == b"done:x"
    assert service.stopped.is_set()
    with pytest.raises(grpc.RpcError) as caught:
        call(b"y", timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


@pytest.mark.parametrize(
    ("module", "variable"),
    [
        ("services.generation", "RLHF_GENERATION_ID_KEY"),
        ("services.feedback", "RLHF_FEEDBACK_API_KEYS"),
        ("services.reward", "RLHF_REWARD_MODEL"),
        ("services.trainer", "RLHF_PPO_TARGET_KL"),
        ("services.simulated_users", "RLHF_SIM_POSITIVE_THRESHOLD"),
    ],
)
def test_help_lists_the_environment(module, variable):
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (
        variable in done.stdout
        and "RLHF_KAFKA_BOOTSTRAP" in done.stdout
        or (module == "services.simulated_users" and variable in done.stdout)
    )


def test_missing_secret_is_a_clear_start_up_error():
    done = subprocess.run(
        [sys.executable, "-m", "services.feedback"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0
    assert "RLHF_GENERATION_ID_KEY must be set" in done.stderr
