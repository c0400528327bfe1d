"""The one gRPC server bootstrap: credentials, bounded calls, health checking, reflection,
Prometheus /metrics, graceful stop.

A service supplies a `Service` (register its servicers, start and stop its background work, and
say who may call each method). The bootstrap serves it, marks it SERVING once started, and on
SIGTERM marks it NOT_SERVING, lets in-flight RPCs finish within the grace period, then stops the
service's background work (flushing producers, committing offsets) before the process exits.

Every call passes one guard (`_Guard`) before the service sees it:

- who: the caller's key (`rlhf.auth`) against the method's rule, before the request is read:
  UNAUTHENTICATED or PERMISSION_DENIED at once, costing no call slot;
- how many: at most `max_calls` calls at once, each with a thread of its own; one more waits
  up to `slot_wait` for a slot to free (a short burst is served, not refused), then is
  RESOURCE_EXHAUSTED; at most `max_calls` calls wait, on threads of their own, and one more is
  RESOURCE_EXHAUSTED at once (the request is not waited for), so a server whose slots are held
  still refuses at once what it cannot queue;
- how slow: the request message must arrive within `read_timeout` (and a stream's messages
  within that of each other), or the call is cancelled and its slot freed, so clients that send
  headers and then nothing cannot hold the server;
- what: request bytes that are not the method's message are INVALID_ARGUMENT (the client's
  fault), not the framework's INTERNAL.

Health checks have threads and slots of their own, so they answer while every call slot is busy;
a service that says it is unhealthy (`Service.healthy`) is reported NOT_SERVING until it
recovers.
"""

from __future__ import annotations

import ctypes
import gc
import heapq
import itertools
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from rlhf import bus
from rlhf.auth import (
    DEFAULT_ACCESS,
    OPEN,
    Access,
    Credentials,
    PermissionDenied,
    Principal,
    Unauthenticated,
    set_caller,
)
from rlhf.config import CommonConfig, ConfigError, parse_args
from rlhf.http_server import MetricsHttpServer
from rlhf.local import stop_on_signals

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
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_CALLS = 4  # health checks answered at once, on threads of their own
SPARE_THREADS = 4  # beyond slots and waiting calls: refusals never wait behind busy calls
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


class Rejected(Exception):
    """A request refused at the edge: the status code for the client, a reason for metrics."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


class Undecodable:
    """Stands in for request bytes that are not the expected message, so a handler answers
    INVALID_ARGUMENT (the client's fault) rather than the framework's INTERNAL."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


class _Refused(Undecodable):
    """Undecodable bytes the guard answers itself (the method's parser was not tolerant)."""


def tolerant_parser(
    parse: Callable[[bytes], Any] | None, marker: type[Undecodable] = Undecodable
) -> Callable[[bytes], Any]:
    """A request deserializer that returns `marker` instead of raising. A handler built with
    one answers undecodable requests itself (feedback counts them per tenant); for the others
    the server bootstrap answers INVALID_ARGUMENT."""

    def tolerant(data: bytes) -> Any:
        if parse is None:
            return data
        try:
            return parse(data)
        except (DecodeError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8 in a string
            return marker(str(exc) or type(exc).__name__)

    return tolerant


@dataclass(frozen=True)
class TlsIdentity:
    """A certificate chain and its private key (PEM), for gRPC and any HTTP endpoint, and the
    CA bundle that client certificates must chain to when `client_ca` is set (mutual TLS)."""

    cert_chain: bytes
    private_key: bytes
    cert_file: str = ""
    key_file: str = ""
    client_ca: bytes | None = None
    client_ca_file: str = ""

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for HTTP endpoints (TLS 1.2 or newer)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def tls_from_config(config: CommonConfig) -> TlsIdentity | None:
    """The configured TLS identity, None for plaintext; ConfigError if half set or unreadable."""
    cert, key = config.tls_cert_file, config.tls_key_file
    if not cert and not key:
        if config.tls_client_auth:
            raise ConfigError("RLHF_TLS_CLIENT_AUTH needs RLHF_TLS_CERT_FILE and RLHF_TLS_KEY_FILE")
        return None
    if not cert or not key:
        raise ConfigError("set both RLHF_TLS_CERT_FILE and RLHF_TLS_KEY_FILE, or neither")
    try:
        client_ca = Path(config.tls_ca_file).read_bytes() if config.tls_client_auth else None
        return TlsIdentity(
            Path(cert).read_bytes(),
            Path(key).read_bytes(),
            cert,
            key,
            client_ca,
            config.tls_ca_file if config.tls_client_auth else "",
        )
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate, key or CA: {exc}") from exc


class Service(Protocol):
    """What a service gives the bootstrap. Besides these, it may have:

    - `rules`: `{"/package.Service/Method": rlhf.auth.Access}`, who may call each method (a
      method without a rule is for operators only; health and reflection are open);
    - `apps`: `rlhf.auth.Credentials` of the apps it accepts (app role), besides the service,
      reader and operator keys of the process's configuration;
    - `healthy()`: False while its background work has failed (reported NOT_SERVING).
    """

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


@dataclass(frozen=True)
class CallLimits:
    max_calls: int = 32  # calls served at once, each on a thread of its own
    read_timeout: float = 10.0  # seconds for a request message to arrive
    slot_wait: float = 0.1  # seconds a call that finds every slot busy waits for one

    @property
    def waiting(self) -> int:
        """Calls that may wait for a slot at once, each on a thread of its own."""
        return self.max_calls if self.slot_wait > 0 else 0

    @property
    def threads(self) -> int:
        """Threads the server needs: one per slot, one per waiting call, and spares that
        refuse at once while every slot and waiting place is taken."""
        return self.max_calls + self.waiting + SPARE_THREADS


class _Deadlines:
    """One thread that cancels calls whose request did not arrive in time (a timer per call
    would be a thread per call)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Callable[[], Any]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="grpc-read-deadlines", daemon=True)
        self._thread.start()

    def arm(self, seconds: float, on_expiry: Callable[[], Any]) -> int:
        token = next(self._ids)
        with self._lock:
            self._armed[token] = on_expiry
            heapq.heappush(self._heap, (time.monotonic() + seconds, token))
            if self._heap[0][1] == token:  # sooner than what the thread waits for
                self._lock.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._lock:
            self._armed.pop(token, None)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def _run(self) -> None:
        while True:
            expired = []
            with self._lock:
                while not self._stopped:
                    now = time.monotonic()
                    while self._heap and (
                        self._heap[0][0] <= now or self._heap[0][1] not in self._armed
                    ):
                        _, token = heapq.heappop(self._heap)
                        action = self._armed.pop(token, None)
                        if action is not None:
                            expired.append(action)
                    if expired:
                        break
                    self._lock.wait(self._heap[0][0] - now if self._heap else None)
                if self._stopped:
                    return
            for action in expired:
                try:
                    action()
                except Exception:  # a call that ended meanwhile
                    log.debug("cancelling a call past its read deadline failed", exc_info=True)


class _Slot:
    """One call slot, released exactly once. When every slot is busy, the call waits up to
    `wait` seconds for one, if it gets one of the `waiting` places (else it is refused at once);
    `held` says whether it got a slot."""

    def __init__(
        self,
        slots: threading.BoundedSemaphore,
        waiting: threading.BoundedSemaphore | None = None,
        wait: float = 0.0,
    ) -> None:
        self._slots = slots
        self._held = slots.acquire(blocking=False)
        if not self._held and wait > 0 and waiting is not None and waiting.acquire(False):
            try:
                self._held = slots.acquire(timeout=wait)
            finally:
                waiting.release()

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    context.abort(code, message)


class _Guard(grpc.ServerInterceptor):
    """Credentials, call slots, read deadlines, tolerant decoding and metrics, for every call.

    Every request-unary method is served as a request-streaming one, reading its one message
    itself: the framework would otherwise park a thread waiting for it, with no deadline."""

    def __init__(
        self,
        service: str,
        credentials: Credentials,
        rules: Mapping[str, Access],
        limits: CallLimits,
        deadlines: _Deadlines,
        health_pool: futures.ThreadPoolExecutor,
    ) -> None:
        self._service = service
        self._credentials = credentials
        self._rules = dict(rules)
        self._limits = limits
        self._deadlines = deadlines
        self._slots = threading.BoundedSemaphore(limits.max_calls)
        self._waiting = threading.BoundedSemaphore(limits.waiting) if limits.waiting else None
        self._health_slots = threading.BoundedSemaphore(HEALTH_CALLS)
        self._health_pool = health_pool

    def _rule(self, method: str) -> Access:
        if method in self._rules:
            return self._rules[method]
        return OPEN if method.startswith(_OPEN_SERVICES) else DEFAULT_ACCESS

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        name = method.rsplit("/", 1)[-1]
        if method == HEALTH_CHECK:
            # No wait: a probe wants its answer now, and the health threads are few.
            return self._guarded(handler, name, None, self._health_slots, self._health_pool, 0.0)
        rule = self._rule(method)
        principal: Principal | None = None
        try:
            principal = self._credentials.identify(handler_call_details.invocation_metadata)
            rule.check(principal)
        except Unauthenticated as exc:
            if not rule.open:
                return self._refusal(handler, name, grpc.StatusCode.UNAUTHENTICATED, str(exc))
            principal = None  # an open method: an unknown key is no key
        except PermissionDenied as exc:
            return self._refusal(handler, name, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return self._guarded(handler, name, principal, self._slots, None, self._limits.slot_wait)

    # -- refusals before anything is read ------------------------------------------------------

    def _refusal(self, handler: Any, method: str, code: grpc.StatusCode, message: str) -> Any:
        def refuse(_requests: Any, context: grpc.ServicerContext) -> Any:
            RPCS.labels(self._service, method, code.name).inc()
            _abort(context, code, message)

        return self._as_streaming(handler, refuse, None)

    def _as_streaming(
        self, handler: Any, behavior: Callable, deserializer: Callable | None
    ) -> grpc.RpcMethodHandler:
        wrap = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return wrap(
            behavior,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- accepted calls ------------------------------------------------------------------------

    def _guarded(
        self,
        handler: Any,
        method: str,
        principal: Principal | None,
        slots: threading.BoundedSemaphore,
        pool: futures.ThreadPoolExecutor | None,
        wait: float,
    ) -> grpc.RpcMethodHandler:
        if handler.request_streaming:
            inner = handler.stream_unary or handler.stream_stream
            deserializer = handler.request_deserializer
        else:
            inner = handler.unary_unary or handler.unary_stream
            deserializer = tolerant_parser(handler.request_deserializer, _Refused)
        streaming_request = handler.request_streaming

        def begin(requests: Iterator[Any], context: grpc.ServicerContext) -> tuple[_Slot, Any]:
            slot = _Slot(slots, self._waiting, wait)
            if not slot.held:
                RPCS.labels(self._service, method, "RESOURCE_EXHAUSTED").inc()
                _abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self._service} is serving as many calls as it may; retry shortly",
                )
            try:
                if streaming_request:
                    argument = self._timed(requests, context)
                else:
                    argument = self._read_one(requests, context)
                set_caller(principal)
            except BaseException:
                slot.release()
                raise
            return slot, argument

        if handler.response_streaming:

            def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator:
                slot, argument = begin(requests, context)
                try:
                    yield from inner(argument, context)
                finally:
                    slot.release()

        else:

            def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                slot, argument = begin(requests, context)
                try:
                    return self._metered(method, inner, argument, context)
                finally:
                    slot.release()

        if pool is not None:
            behavior.experimental_thread_pool = pool  # type: ignore[attr-defined]
        return self._as_streaming(handler, behavior, deserializer)

    def _read_one(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The call's one request message, within the read deadline."""
        token = self._deadlines.arm(self._limits.read_timeout, context.cancel)
        try:
            request = next(requests)
        except StopIteration:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
        finally:
            self._deadlines.disarm(token)
        if isinstance(request, _Refused):
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not the method's message: {request.detail}",
            )
        return request

    def _timed(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """A request stream whose every message must come within the read deadline."""
        while True:
            token = self._deadlines.arm(self._limits.read_timeout, context.cancel)
            try:
                request = next(requests)
            except StopIteration:
                return
            finally:
                self._deadlines.disarm(token)
            yield request

    def _metered(
        self, method: str, inner: Callable, request: Any, context: grpc.ServicerContext
    ) -> Any:
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


def _grpc_server(
    name: str, interceptor: _Guard, workers: int
) -> tuple[grpc.Server, futures.ThreadPoolExecutor]:
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    server = grpc.server(
        pool,
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    return server, pool


class RunningServer:
    """A started gRPC server plus its /metrics endpoint; `port` is the bound port.

    With `tls`, the port serves TLS only (no plaintext fallback on the same port), and /metrics
    too. `credentials` are the service, reader and operator keys the server accepts (the
    service's own app keys are added); `metrics_open` serves /metrics without a key.
    `health_port`, when not None, also serves health checks alone, in plaintext, for probes
    that cannot speak TLS.
    """

    def __init__(
        self,
        service: Service,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics_port: int | None = 0,
        grace_seconds: float = 10.0,
        tls: TlsIdentity | None = None,
        credentials: Credentials | None = None,
        limits: CallLimits = CallLimits(),
        metrics_open: bool = False,
        health_port: int | None = None,
    ) -> None:
        self.service = service
        self.tls = tls
        self.grace_seconds = grace_seconds
        self.credentials = (credentials or Credentials()) | getattr(service, "apps", Credentials())
        self._health = health.HealthServicer()
        self._deadlines = _Deadlines()
        self._health_pool = futures.ThreadPoolExecutor(HEALTH_CALLS, thread_name_prefix="health")
        rules = getattr(service, "rules", {})
        guard = _Guard(
            service.name, self.credentials, rules, limits, self._deadlines, self._health_pool
        )
        self._server, self._pool = _grpc_server(service.name, guard, limits.threads)
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
        self.health_port: int | None = None
        self._health_server: grpc.Server | None = None
        if health_port is not None:
            health_limits = CallLimits(HEALTH_CALLS, limits.read_timeout, slot_wait=0.0)
            health_guard = _Guard(
                f"{service.name}-health",
                Credentials(),
                {},
                health_limits,
                self._deadlines,
                self._health_pool,
            )
            self._health_server, _ = _grpc_server(
                f"{service.name}-health", health_guard, health_limits.threads
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{host}:{health_port}")
            if self.health_port == 0:
                raise OSError(f"could not bind the health port {host}:{health_port}")
        self.metrics_port: int | None = None
        self._metrics: MetricsHttpServer | None = None
        if metrics_port is not None:
            self._metrics = MetricsHttpServer(
                (host, metrics_port),
                tls.ssl_context() if tls is not None else None,
                None if metrics_open else self.credentials,
                limits.read_timeout,
            )
            self.metrics_port = self._metrics.port
        self._serving = True
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch_health, name="health", daemon=True)

    def start(self) -> RunningServer:
        self._server.start()
        if self._health_server is not None:
            self._health_server.start()
        if self._metrics is not None:
            self._metrics.start()
        self.service.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watcher.start()
        log.info(
            "%s serving gRPC on port %s, metrics on %s",
            self.service.name,
            self.port,
            self.metrics_port,
        )
        return self

    def _set_health(self, status: Any) -> None:
        for name in ["", *self._names[:-2]]:
            self._health.set(name, status)

    def _watch_health(self) -> None:
        """NOT_SERVING while the service says it is unhealthy, SERVING again once it recovers."""
        healthy = getattr(self.service, "healthy", None)
        if healthy is None:
            return
        while not self._stopped.wait(1.0):
            try:
                now = bool(healthy())
            except Exception:
                log.exception("%s: health check of the service failed", self.service.name)
                now = False
            if now != self._serving and not self._stopped.is_set():
                self._serving = now
                status = health_pb2.HealthCheckResponse
                self._set_health(status.SERVING if now else status.NOT_SERVING)
                log.warning("%s is %s", self.service.name, "healthy again" if now else "unhealthy")

    def stop(self) -> None:
        """Drain: refuse new work, finish in-flight RPCs, then stop background work."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(self.grace_seconds).wait()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        self.service.stop()
        if self._metrics is not None:
            self._metrics.stop()
        self._deadlines.stop()
        self._pool.shutdown(wait=False)
        self._health_pool.shutdown(wait=False)
        log.info("%s stopped", self.service.name)

    def wait(self) -> None:
        self._stopped.wait()


def serve_until_signalled(server: RunningServer) -> None:
    """Run a started server until SIGTERM or SIGINT, then drain and return."""
    name = server.service.name
    received = stop_on_signals(lambda sig: log.info("%s received %s, draining", name, sig.name))
    received.wait()
    server.stop()


AUTOGROUP = Path("/proc/self/autogroup")

# glibc's malloc.h parameters; its largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
HEAP_BLOCK_MAX = 32 << 20


def keep_heap(megabytes: int, library: ctypes.CDLL | None = None) -> bool:
    """Let the C heap keep up to `megabytes` MiB of freed memory for reuse (RLHF_HEAP_KEEP_MB),
    and take blocks of up to 32 MiB (or `megabytes`, if less) from the heap; whether the C
    library took the settings (glibc does; others have no `mallopt` or ignore it).

    Under glibc's adaptive default a forward pass's activations (blocks of 1-32 MiB) are handed
    back to the OS when freed and faulted in afresh on the next call: the reward service's
    forward of 32 pairs took about 1,150 minor page faults per call (70 with 256 MiB kept), and
    its median time per call varied from process to process, 33.9-39.6 ms over 8 processes
    (kept: 32.0-34.0 ms). The three go together: setting any of them stops glibc adapting its
    128 KiB mmap threshold, so a trim threshold alone, or a top pad smaller than a call's peak,
    sends every larger block to a fresh mapping: 30,000 faults and twice the time per call.
    Resident memory stays the same when nothing frees more than it reuses (497 MB either way)."""
    if megabytes == 0:
        return False
    keep = megabytes << 20
    try:
        mallopt = (library or ctypes.CDLL(None)).mallopt
    except AttributeError:
        log.info("RLHF_HEAP_KEEP_MB=%d ignored: this C library has no mallopt", megabytes)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    wanted = (
        (M_MMAP_THRESHOLD, min(keep, HEAP_BLOCK_MAX)),
        (M_TRIM_THRESHOLD, keep),
        (M_TOP_PAD, keep // 4),
    )
    if not all([mallopt(parameter, value) == 1 for parameter, value in wanted]):
        log.info("RLHF_HEAP_KEEP_MB=%d: the C library refused some malloc settings", megabytes)
        return False
    return True


def lower_priority(nice: int) -> None:
    """Lower this process's scheduling priority by `nice` (RLHF_NICE): a training process on
    CPUs shared with serving then takes only what serving leaves (its session's autogroup too,
    `nice_autogroup`)."""
    if nice < 0 or nice > 19:
        raise SystemExit(f"RLHF_NICE={nice}: expected 0 to 19 (a process cannot raise itself)")
    if nice:
        os.nice(nice)
        grouped = nice_autogroup(nice)
        log.info("running at nice %d%s", os.nice(0), " (and its autogroup)" if grouped else "")


def nice_autogroup(nice: int, path: Path = AUTOGROUP) -> bool:
    """Give this process's autogroup the nice value `nice`, if the process leads its session
    (the autogroup is then its own); whether it did.

    With the kernel's autogroup scheduling (sched_autogroup_enabled, on by default in many
    kernels), CPU is first shared fairly between sessions, and a process's own nice counts only
    against the other processes of its session. make up's launcher starts every service in a
    session of its own (so Ctrl-C reaches the launcher alone), so a trainer at nice 15 still
    competed with generation at full weight: on 2 cores, with the ppo and release stages busy,
    `rlhf generate` took 24-105 s instead of 7-8. The autogroup's nice gives the session the
    weight the process asked for. A process that shares its session (started from a shell) leaves
    the group alone: it would lower the shell's priority with it."""
    if os.getsid(0) != os.getpid():
        return False
    try:
        current = int(path.read_text().split("nice", 1)[1])
        if current < nice:
            path.write_text(f"{nice}\n")
    except (OSError, ValueError, IndexError):  # no autogroups here (disabled, or a container)
        return False
    return True


def configure_logging(service: str) -> None:
    """Structured one-line logs: time, service, level, logger, message."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for logger in ("kafka.net.selector", "kafka.net.transport"):
        logging.getLogger(logger).addFilter(closed_socket_race)


def closed_socket_race(record: logging.LogRecord) -> bool:
    """False for kafka-python's errors on a socket already closed: "Unhandled exception in task"
    on file descriptor -1 (selector) and "Error receiving network data" on a socket already set
    to None (transport). A consumer or producer closing (a service stopping) while its I/O
    thread still waited to read; nothing is lost, the connection is gone either way. Their
    tracebacks would read as a crash in every stop's logs (seen in CI: trainers stopping
    cleanly logged each)."""
    error = record.exc_info[1] if record.exc_info else None
    closed_fd = isinstance(error, ValueError) and "Invalid file descriptor: -1" in str(error)
    no_socket = isinstance(error, AttributeError) and "'NoneType' object has no attribute" in str(
        error
    )
    return not (closed_fd or no_socket)


def call_limits(config: CommonConfig) -> CallLimits:
    """The configured call limits (RLHF_MAX_CALLS, RLHF_READ_TIMEOUT_SECONDS,
    RLHF_CALL_SLOT_WAIT_MS)."""
    return CallLimits(
        config.max_calls, config.read_timeout_seconds, config.call_slot_wait_ms / 1000
    )


def server_for(service: Service, config: CommonConfig, port: int | None = None) -> RunningServer:
    """A server for `service` on the configured address (or `port`, e.g. 0 in tests), with the
    configured TLS, credentials, call limits and health port."""
    return RunningServer(
        service,
        host=config.grpc_host,
        port=config.grpc_port if port is None else port,
        metrics_port=config.metrics_port,
        grace_seconds=config.shutdown_grace_seconds,
        tls=tls_from_config(config),
        credentials=config.auth.credentials(),
        limits=call_limits(config),
        metrics_open=config.auth.metrics_open,
        health_port=config.health_port if config.health_port >= 0 else None,
    )


def run_main(
    name: str, config_cls: type[C], build: Callable[[C], Service], description: str
) -> None:
    """The whole `main()` of a service: --help, config, logs, serve until SIGTERM."""
    config = parse_args(config_cls, description)
    configure_logging(name)
    bus.configure(config.kafka)
    lower_priority(config.nice)
    keep_heap(config.heap_keep_mb)
    try:
        server = server_for(build(config), config)
    except ConfigError as exc:
        raise SystemExit(f"rlhf-{name}: {exc}") from exc
    running = server.start()
    settle_heap()
    serve_until_signalled(running)


def settle_heap() -> None:
    """Take what start-up built (modules, models, settings) out of the cycle collector's reach.

    It lives as long as the process, yet every full collection would scan it again: in the
    feedback service under load that was 48k objects and 16 ms of each full collection, about
    once a second. Frozen objects are never collected, so what start-up retires later must be
    freed by reference counting alone: the first served model version is (a test holds that).
    """
    gc.collect()
    gc.freeze()
