"""`make up`'s port reservations (`rlhf.local.PortReservations`), on real loopback sockets: a held
port stays out of everyone else's reach until released, yet the service planned on it (a gRPC
server, the stdlib HTTP server) binds it; a port already held, as a listener or as a connection's
local port (how feedback once failed to bind 50052 in CI), is traded for a free one."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rlhf.broker import free_port
from rlhf.http_server import BoundedHttpServer
from rlhf.local import PortReservations


@pytest.fixture
def ports() -> Iterator[PortReservations]:
    reservations = PortReservations()
    yield reservations
    reservations.release()


def _plain_bind(port: int) -> bool:
    """Whether a socket without SO_REUSEADDR (a client's, say) can bind the port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_free_preferred_port_is_taken_and_held_until_released(ports):
    preferred = free_port()
    assert ports.take(preferred) == preferred
    assert not _plain_bind(preferred)
    ports.release()
    assert _plain_bind(preferred)


def test_a_grpc_server_binds_and_serves_on_a_held_port(ports):
    port = ports.take(free_port())
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)


def test_the_http_server_binds_and_serves_on_a_held_port(ports):
    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(204)
            self.end_headers()

    port = ports.take(free_port())
    server = BoundedHttpServer(("127.0.0.1", port), Ok, None, slots=2)
    try:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
            assert reply.status == 204
    finally:
        server.shutdown()
        server.server_close()


def test_a_listening_port_is_traded_for_a_free_one(ports):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        port = ports.take(busy)
    assert port != busy
    assert not _plain_bind(port)  # and the replacement is held too


def test_a_port_some_connection_uses_as_its_local_port_is_traded_for_a_free_one(ports):
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.bind(("127.0.0.1", 0))  # as the kernel gives an outgoing connection its port
        client.connect(listener.getsockname())
        local = client.getsockname()[1]
        port = ports.take(local)
        assert port != local
        server = grpc.server(futures.ThreadPoolExecutor(1))
        try:  # what planning on `local` used to end in
            with pytest.raises(RuntimeError, match="Failed to bind"):
                server.add_insecure_port(f"127.0.0.1:{local}")
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        finally:
            server.stop(None)
