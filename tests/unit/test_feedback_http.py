"""The HTTP server's own defences, on real sockets with the in-memory broker: bounded
connections (idle clients cannot pin every thread), bounded bodies, CORS for browsers."""

import http.client
import json
import socket
import time

import pytest

from rlhf.config import ConfigError
from services.feedback.config import FeedbackConfig
from services.feedback.http_api import FeedbackHttpApi, FeedbackHttpServer
from tests.unit.feedback_fakes import API_KEY, SIGNER, FakePublisher, make_ingest


@pytest.fixture
def http_server():
    publisher = FakePublisher()
    api = FeedbackHttpApi(make_ingest(publisher), max_body_bytes=1024, cors_origins=("https://a",))
    server = FeedbackHttpServer(api, "127.0.0.1", 0, max_connections=2, read_timeout=1.0).start()
    yield server, publisher
    server.stop()


def _post(port, body, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    base = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/feedback", body=body, headers={**base, **(headers or {})})
    reply = connection.getresponse()
    return reply.status, dict(reply.getheaders()), reply.read()


def _thumb_json(key="web-1"):
    return json.dumps(
        {"generationId": SIGNER.issue(2), "idempotencyKey": key, "thumb": "THUMB_UP"}
    ).encode()


def test_post_is_stored_and_answers_json(http_server):
    server, publisher = http_server
    status, headers, body = _post(server.port, _thumb_json())
    assert status == 200 and headers["Content-Type"] == "application/json"
    reply = json.loads(body)
    assert reply["eventId"] == publisher.event_ids()[0] and reply["duplicate"] is False


def test_idle_connections_cannot_take_every_thread(http_server):
    server, _ = http_server
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    time.sleep(0.2)
    extra = socket.create_connection(("127.0.0.1", server.port))
    extra.settimeout(5)
    # Answered 503 and closed at once, not queued behind the idle ones.
    reply = extra.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in reply
    extra.close()
    for sock in idle:
        sock.close()
    time.sleep(0.2)
    assert _post(server.port, _thumb_json("after-idle"))[0] == 200


def test_a_body_that_stops_short_is_answered_408(http_server):
    server, publisher = http_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 50\r\n\r\n{"
        )
        reply = connection.makefile("rb").read()
    assert reply.split(b" ", 2)[1] == b"408", reply
    assert b"read_timeout" in reply and publisher.records == []


def test_oversize_body_is_refused_unread(http_server):
    server, publisher = http_server
    status, _, body = _post(server.port, b"x" * 2048)
    assert status == 413 and json.loads(body)["error"]["reason"] == "body_too_large"
    assert publisher.records == []


def test_cors_preflight_and_reply_for_allowed_origins_only(http_server):
    server, _ = http_server
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("OPTIONS", "/v1/feedback", headers={"Origin": "https://a"})
    reply = connection.getresponse()
    reply.read()
    assert reply.status == 204
    assert reply.getheader("Access-Control-Allow-Origin") == "https://a"
    assert "authorization" in reply.getheader("Access-Control-Allow-Headers")
    _, headers, _ = _post(server.port, _thumb_json("cors"), {"Origin": "https://evil"})
    assert "Access-Control-Allow-Origin" not in headers


def _config(**overrides):
    settings = {"generation_id_key": "k" * 32, "api_keys": ("t=" + "a" * 20,), **overrides}
    return FeedbackConfig(**settings)


@pytest.mark.parametrize(
    "overrides",
    [
        {"api_keys": ("t=short",)},
        {"api_keys": ("no-separator",)},
        {"tls_cert_file": "/nonexistent/cert.pem"},
        {"tls_cert_file": "/etc/hostname", "tls_key_file": "/nonexistent/key.pem"},
        {"max_stream_items": 0},
    ],
)
def test_bad_settings_fail_at_start_up(overrides):
    with pytest.raises(ConfigError):
        _config(**overrides).validate()


def test_default_settings_are_valid():
    _config().validate()
