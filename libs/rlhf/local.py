"""Where `make up` serves things on this machine: the well-known local ports and `run/up.env`.

The launcher writes `run/up.env`; the `rlhf` command line reads it, so both name the addresses
the same way. Kept free of heavy imports: the command line loads it on every call.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

# Well-known local ports (gRPC, metrics); a busy one is replaced by a free one and printed. The
# gRPC ports lie inside Linux's ephemeral range (32768-60999): see PortReservations.
PORTS = {
    "generation": (50051, 9101),
    "feedback": (50052, 9102),
    "reward": (50053, 9103),
    "trainer": (50054, 9104),
    "reward-trainer": (50055, 9105),
    "playground": (50056, 9106),
    "release-trainer": (50057, 9107),
}
BROKER_PORT = 9092
HTTP_PORT = 8080  # the generation service's HTTP API (TGI and OpenAI chat completions)
FEEDBACK_HTTP_PORT = 8081  # the feedback service's HTTP JSON API
PLAYGROUND_PORT = 8082  # the playground's chat page
PROMETHEUS_PORT = 9090
UP_ENV = Path("run") / "up.env"


def address_variable(service: str) -> str:
    """The variable holding a service's gRPC address, e.g. RLHF_REWARD_TRAINER_ADDRESS."""
    return f"RLHF_{service.upper().replace('-', '_')}_ADDRESS"


def default_address(service: str) -> str:
    return f"127.0.0.1:{PORTS[service][0]}"


class PortReservations:
    """Ports chosen for services that are not listening yet, held so nothing takes them meanwhile.

    The launcher plans every port before it starts the first service, then starts them one by
    one. The gRPC ports (50051-50057) lie inside Linux's ephemeral range, so an outgoing
    connection of a service started earlier (a Kafka client's) could be given one as its local
    port, and the service meant to listen there then failed to bind (CI, 2026-12-07: feedback on
    127.0.0.1:50052). A port held by a bound, non-listening socket is skipped when the kernel picks
    local ports for outgoing connections, and a server that sets SO_REUSEADDR, as gRPC and the
    stdlib HTTP servers do, can still bind it and listen (checked in a private network namespace
    with a narrowed ephemeral range). `take` also moves off a port that is already bound,
    listening or not, which the older connect probe only caught for listeners.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._held: list[socket.socket] = []

    def take(self, preferred: int) -> int:
        """`preferred` if nothing holds it, else a free port; held until `release`."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, preferred))
        except OSError:  # held: listening, or a connection's local port
            sock.bind((self.host, 0))
        self._held.append(sock)
        return int(sock.getsockname()[1])

    def release(self) -> None:
        """Let go of every port (once the services listen on theirs)."""
        for sock in self._held:
            sock.close()
        self._held.clear()


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an up.env file; empty if it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            values[name] = value
    return values


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes a child process get `sig` when the process starting it dies,
    however it dies (SIGKILL included: Linux delivers it), so nothing `make up` started outlives
    it. Call from the thread that lives as long as the children (the main thread). None off
    Linux."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return arm


def stop_on_signals(
    notify: Callable[[signal.Signals], None] | None = None,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> threading.Event:
    """An event set when the process receives one of `signals` (call from the main thread).

    The Python-level handler does nothing: setting an Event (or logging) inside a signal handler
    deadlocks when the signal lands while the main thread holds that Event's own lock, in
    `wait()` or in a previous signal's `set()` (a stop request arriving as SIGTERM from the
    launcher and again from a dying parent froze services that way). The C handler writes the
    signal's number to a pipe instead (`signal.set_wakeup_fd`), and a watcher thread reads it,
    calls `notify` and sets the event."""
    stop = threading.Event()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    wanted = {int(s) for s in signals}
    for sig in signals:
        signal.signal(sig, lambda _signum, _frame: None)

    def watch() -> None:
        while True:
            for number in os.read(read_fd, 64):
                if number in wanted:
                    if notify is not None:
                        notify(signal.Signals(number))
                    stop.set()

    threading.Thread(target=watch, name="signals", daemon=True).start()
    return stop
