"""The bounded HTTP server's errors go through logging: a client gone mid-reply is a debug line,
anything else an error with its traceback, and nothing is printed to stderr (socketserver's
default), where `make up` showed a scrape cut short by Prometheus stopping as a traceback."""

import http.client
import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from rlhf.http_server import BoundedHttpServer


class _Failing(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        if self.path == "/gone":
            raise BrokenPipeError(32, "Broken pipe")  # as wfile.write raises it
        if self.path == "/gone-tls":
            raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
        raise RuntimeError("a bug in a handler")


@pytest.fixture
def port():
    server = BoundedHttpServer(("127.0.0.1", 0), _Failing, tls=None, slots=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path)
    with pytest.raises(http.client.RemoteDisconnected):  # closed without a reply
        connection.getresponse()


def test_a_client_gone_mid_reply_is_a_debug_line_and_a_bug_an_error(port, caplog, capfd):
    with caplog.at_level(logging.DEBUG, logger="rlhf.http_server"):
        _get(port, "/gone")
        _get(port, "/gone-tls")
        _get(port, "/bug")
    *gone, bug = caplog.records
    assert len(gone) == 2
    assert all(r.levelno == logging.DEBUG and "went away" in r.getMessage() for r in gone)
    assert bug.levelno == logging.ERROR and "HTTP request from" in bug.getMessage()
    assert bug.exc_info is not None and "a bug in a handler" in str(bug.exc_info[1])
    assert "Traceback" not in capfd.readouterr().err
