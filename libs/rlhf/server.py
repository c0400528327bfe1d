"""The one gRPC server bootstrap: health checking, reflection, Prometheus /metrics, graceful stop.

A service supplies a `Service` (register its servicers, start and stop its background work). The
bootstrap serves it, marks it SERVING once started, and on SIGTERM marks it NOT_SERVING, lets
in-flight RPCs finish within the grace period, then stops the service's background work (flushing
producers, committing offsets) before the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server

from rlhf.config import CommonConfig, ConfigError, parse_args

log = logging.getLogger(__name__)

C = TypeVar("C", bound=CommonConfig)

RPCS = Counter(
    "rlhf_grpc_requests_total", "gRPC requests by outcome", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "rlhf_grpc_request_seconds",
    "gRPC request latency",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class Rejected(Exception):
    """A request refused at the edge: the status code for the client, a reason for metrics."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class TlsIdentity:
    """A server certificate chain and its private key (PEM), for gRPC and any HTTP endpoint."""

    cert_chain: bytes
    private_key: bytes
    cert_file: str = ""
    key_file: str = ""

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)])

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for HTTP endpoints (TLS 1.2 or newer)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def tls_from_config(config: CommonConfig) -> TlsIdentity | None:
    """The configured TLS identity, None for plaintext; ConfigError if half set or unreadable."""
    cert, key = config.tls_cert_file, config.tls_key_file
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("set both RLHF_TLS_CERT_FILE and RLHF_TLS_KEY_FILE, or neither")
    try:
        return TlsIdentity(Path(cert).read_bytes(), Path(key).read_bytes(), cert, key)
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate or key: {exc}") from exc


class Service(Protocol):
    name: str  # short name for logs and metrics, e.g. "generation"

    def register(self, server: grpc.Server) -> list[str]:
        """Add servicers to the server; return their full service names."""
        ...

    def start(self) -> None:
        """Start background work (consumers, batchers) once the server is bound."""
        ...

    def stop(self) -> None:
        """Stop background work; flush and commit what must not be lost."""
        ...


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Counts requests by status code and times them, for unary and client-streaming handlers."""

    def __init__(self, service: str) -> None:
        self._service = service

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            wrap, inner = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        elif handler.stream_unary is not None:
            wrap, inner = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        else:
            return handler
        return wrap(
            self._timed(method, inner),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _timed(self, method: str, inner: Callable) -> Callable:
        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                response = inner(request, context)
                if context.code() not in (None, grpc.StatusCode.OK):
                    code = context.code().name
                return response
            except Exception:
                code = (context.code() or grpc.StatusCode.UNKNOWN).name
                raise
            finally:
                RPCS.labels(self._service, method, code).inc()
                RPC_LATENCY.labels(self._service, method).observe(time.perf_counter() - start)

        return timed


class RunningServer:
    """A started gRPC server plus its /metrics endpoint; `port` is the bound port.

    With `tls`, the port serves TLS only (no plaintext fallback on the same port).
    """

    def __init__(
        self,
        service: Service,
        host: str = "0.0.0.0",
        port: int = 0,
        metrics_port: int | None = 0,
        max_workers: int = 16,
        grace_seconds: float = 10.0,
        tls: TlsIdentity | None = None,
    ) -> None:
        self.service = service
        self.tls = tls
        self.grace_seconds = grace_seconds
        self._health = health.HealthServicer()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=service.name),
            interceptors=[_MetricsInterceptor(service.name)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        names = service.register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._names = [*names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(self._names, self._server)
        address = f"{host}:{port}"
        if tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, tls.grpc_credentials())
        if self.port == 0:
            raise OSError(f"could not bind gRPC port {host}:{port}")
        self.metrics_port: int | None = None
        self._metrics_http = None
        if metrics_port is not None:
            self._metrics_http, _ = start_http_server(metrics_port, addr=host)
            self.metrics_port = self._metrics_http.server_port
        self._stopped = threading.Event()

    def start(self) -> RunningServer:
        self._server.start()
        self.service.start()
        for name in ["", *self._names[:-2]]:
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "%s serving gRPC on port %s, metrics on %s",
            self.service.name,
            self.port,
            self.metrics_port,
        )
        return self

    def stop(self) -> None:
        """Drain: refuse new work, finish in-flight RPCs, then stop background work."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(self.grace_seconds).wait()
        self.service.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info("%s stopped", self.service.name)

    def wait(self) -> None:
        self._stopped.wait()


def serve_until_signalled(server: RunningServer) -> None:
    """Run a started server until SIGTERM or SIGINT, then drain and return."""
    received = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s received %s, draining", server.service.name, signal.Signals(signum).name)
        received.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    received.wait()
    server.stop()


def lower_priority(nice: int) -> None:
    """Lower this process's scheduling priority by `nice` (RLHF_NICE): a training process on
    CPUs shared with serving then takes only what serving leaves."""
    if nice < 0 or nice > 19:
        raise SystemExit(f"RLHF_NICE={nice}: expected 0 to 19 (a process cannot raise itself)")
    if nice:
        os.nice(nice)
        log.info("running at nice %d", os.nice(0))


def configure_logging(service: str) -> None:
    """Structured one-line logs: time, service, level, logger, message."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def server_for(service: Service, config: CommonConfig, port: int | None = None) -> RunningServer:
    """A server for `service` on the configured address (or `port`, e.g. 0 in tests).

    Serves TLS when RLHF_TLS_CERT_FILE and RLHF_TLS_KEY_FILE are set.
    """
    return RunningServer(
        service,
        host=config.grpc_host,
        port=config.grpc_port if port is None else port,
        metrics_port=config.metrics_port,
        grace_seconds=config.shutdown_grace_seconds,
        tls=tls_from_config(config),
    )


def run_main(
    name: str, config_cls: type[C], build: Callable[[C], Service], description: str
) -> None:
    """The whole `main()` of a service: --help, config, logs, serve until SIGTERM."""
    config = parse_args(config_cls, description)
    configure_logging(name)
    lower_priority(config.nice)
    try:
        server = server_for(build(config), config)
    except ConfigError as exc:
        raise SystemExit(f"rlhf-{name}: {exc}") from exc
    serve_until_signalled(server.start())
