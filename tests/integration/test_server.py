"""The shared server bootstrap: SIGTERM-style stop drains in-flight calls; calls are bounded
and a silent client cannot freeze a server; every entry point documents its settings in --help."""

import contextlib
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.auth import OPEN, SERVICE, Credentials, allow
from rlhf.server import CallLimits, RunningServer
from tests.conftest import SERVICE_AUTH, SERVICE_KEY, wait_until

SLOW = "/test.Slow/Call"


class SlowService:
    """A raw gRPC method that takes a while (a second, or until `gate` is set), to have work
    in flight during shutdown or while call slots are full."""

    name = "slow"
    rules = {SLOW: OPEN}

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.stopped = threading.Event()
        self.entered = threading.Event()
        self.gate = gate

    def register(self, server):
        def call(request: bytes, context) -> bytes:
            self.entered.set()
            if self.gate is None:
                time.sleep(1.0)
            else:
                self.gate.wait(10)
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


class Silent:
    """Calls that send their headers and then never their request message."""

    def __init__(self) -> None:
        self._release = threading.Event()

    def requests(self):
        self._release.wait()
        return
        yield  # a generator that yields nothing until released

    def release(self) -> None:
        self._release.set()


def test_silent_callers_cannot_freeze_a_server():
    """N calls withholding their request (each on its own connection) fill the call slots: more
    calls are RESOURCE_EXHAUSTED once the slot wait has passed (no slot frees), health checks
    still answer SERVING from their own threads, and once the read deadline passes the silent
    calls are cancelled and the server serves again."""
    service = SlowService()
    service.rules = {SLOW: allow(SERVICE)}
    server = RunningServer(
        service,
        port=0,
        metrics_port=None,
        grace_seconds=1,
        credentials=Credentials.parse(SERVICE, [f"tests={SERVICE_KEY}"]),
        limits=CallLimits(max_calls=4, read_timeout=2.0, slot_wait=0.2),
    ).start()
    address = f"127.0.0.1:{server.port}"
    silent = Silent()
    connections = [grpc.insecure_channel(address) for _ in range(8)]
    try:
        held = [
            c.stream_unary(SLOW).future(silent.requests(), metadata=SERVICE_AUTH, timeout=30)
            for c in connections
        ]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            call = channel.unary_unary(SLOW)

            def full() -> bool:
                try:
                    call(b"x", metadata=SERVICE_AUTH, timeout=5)
                except grpc.RpcError as exc:
                    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False

            assert wait_until(full, timeout=5)
            started = time.monotonic()
            for _ in range(5):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < 2
            # The silent calls are cancelled at the read deadline; refused ones were told so.
            codes = sorted(f.exception(timeout=10).code().name for f in held)
            assert codes == ["CANCELLED"] * 4 + ["RESOURCE_EXHAUSTED"] * 4, codes
            assert call(b"y", metadata=SERVICE_AUTH, timeout=5) == b"done:y"
    finally:
        silent.release()
        for connection in connections:
            connection.close()
        server.stop()


def test_credentials_are_checked_before_the_request_is_read():
    service = SlowService()
    service.rules = {SLOW: allow(SERVICE)}
    server = RunningServer(
        service,
        port=0,
        metrics_port=None,
        grace_seconds=1,
        credentials=Credentials.parse(SERVICE, [f"tests={SERVICE_KEY}"]),
    ).start()
    silent = Silent()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for metadata, code in (
                ((), grpc.StatusCode.UNAUTHENTICATED),
                (
                    (("authorization", "Bearer not-a-key-at-all-0000"),),
                    grpc.StatusCode.UNAUTHENTICATED,
                ),
            ):
                # Refused at once although the request never comes: no slot, no wait.
                future = channel.stream_unary(SLOW).future(
                    silent.requests(), metadata=metadata, timeout=5
                )
                assert future.exception(timeout=2).code() == code
            unlisted = channel.unary_unary("/test.Slow/Other")
            with pytest.raises(grpc.RpcError) as caught:
                unlisted(b"x", metadata=SERVICE_AUTH, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        silent.release()
        server.stop()


@contextlib.contextmanager
def _one_slot_held(slot_wait: float):
    """A server with one call slot, held by a first call until `gate` is set; yields (gate,
    the method to call, that first call's future)."""
    gate = threading.Event()
    server = RunningServer(
        SlowService(gate),
        port=0,
        metrics_port=None,
        grace_seconds=1,
        limits=CallLimits(max_calls=1, read_timeout=5.0, slot_wait=slot_wait),
    ).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary(SLOW)
            first = call.future(b"a", timeout=20)
            assert server.service.entered.wait(5)
            yield gate, call, first
    finally:
        gate.set()
        server.stop()


def test_a_call_waits_for_a_busy_slot_and_is_served_when_one_frees():
    """A short burst is served, not refused: a call that finds every slot busy waits for one.
    The waiting is bounded too: with every waiting place taken, one more call is refused at
    once (while the waiting call still waits)."""
    with _one_slot_held(slot_wait=30.0) as (gate, call, first):
        waiting = call.future(b"b", timeout=20)
        time.sleep(0.3)
        assert not waiting.done()  # neither refused nor served: waiting for the slot
        with pytest.raises(grpc.RpcError) as caught:
            call(b"c", timeout=10)  # the one waiting place is taken
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not waiting.done()
        gate.set()  # the first call finishes and frees its slot within the wait
        assert first.result(timeout=10) == b"done:a"
        assert waiting.result(timeout=10) == b"done:b"


def test_a_call_is_refused_when_no_slot_frees_within_the_wait():
    with _one_slot_held(slot_wait=0.3) as (gate, call, first):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            call(b"b", timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started >= 0.25  # it waited before it was refused
        assert not first.done()  # the slot was still held all along
        gate.set()
        assert first.result(timeout=10) == b"done:a"
