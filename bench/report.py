"""Shared helpers for the benchmarks: statistics, machine facts, BENCHMARKS.md assembly."""

from __future__ import annotations

import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "bench" / "logs"
RESULTS = ROOT / "bench" / "results"
AREAS = ("feedback", "generation", "reward", "trainer", "loop")


def like_a_service() -> None:
    """Run this benchmark process with the heap policy every service process runs with
    (RLHF_HEAP_KEEP_MB, `rlhf.server.keep_heap`), so an in-process baseline (direct scoring,
    TRL's trainer beside ours) is measured under the same allocator as the service it is
    compared with."""
    from rlhf.config import CommonConfig, load_config
    from rlhf.server import keep_heap

    keep_heap(load_config(CommonConfig).heap_keep_mb)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def repeat(fn: Callable[[], float], times: int) -> list[float]:
    """Run a measurement `times` times; `fn` returns one figure per run."""
    return [fn() for _ in range(times)]


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, no GPU; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def _wakeup_round_trip_us(trips: int = 5000) -> float:
    """Mean microseconds for one thread to wake another and be woken back (a queue each way)."""
    there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (item := there.get()) is not None:
            back.put(item)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    started = time.perf_counter()
    for trip in range(trips):
        there.put(trip)
        back.get()
    elapsed = time.perf_counter() - started
    there.put(None)
    thread.join()
    return 1e6 * elapsed / trips


def machine_speed() -> str:
    """How fast this machine runs right now, for comparing absolute figures across runs: a
    shared host drifts between days, and not evenly. On the evening of 2026-12-06 its matmuls
    ran at full speed (fp32 210-260, bf16 1,500-2,300 GFLOP/s) while a thread wake-up round trip
    took 51-69 us, the reward model's forward over 32 pairs 1.7x its time of the day before and
    every gRPC and Kafka figure fell. The best of three of a pure-Python loop on one core, an
    fp32 matmul on torch's threads and a wake-up round trip between two threads."""
    import torch

    loop_seconds = min(timed(lambda: sum(range(3_000_000))) for _ in range(3))
    size = 1024
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    matmul_seconds = min(timed(lambda: torch.mm(a, b)) for _ in range(3))
    wakeup_us = min(_wakeup_round_trip_us() for _ in range(3))
    return (
        f"pure Python {3 / loop_seconds:.0f} M additions/s on one core, fp32 matmul "
        f"{2 * size**3 / matmul_seconds / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} threads, "
        f"thread wake-up round trip {wakeup_us:.0f} us"
    )


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat: user, nice,
    system, irq and softirq time; not idle, iowait or time stolen by the host)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherLoad:
    """`with OtherLoad() as other:` measures the CPU that processes other than this one and its
    (finished) children used meanwhile, in cores (`other.cores`): what a load average cannot
    tell, since it still counts jobs that ended a minute before."""

    cores: float = 0.0

    def __enter__(self) -> OtherLoad:
        self._start = (time.monotonic(), _machine_busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *_exc: object) -> None:
        started, busy, own = self._start
        elapsed = max(time.monotonic() - started, 1e-9)
        others = (_machine_busy_seconds() - busy) - (_own_seconds() - own)
        self.cores = max(0.0, others) / elapsed


def write_section(area: str, body: str, command: str, speed: str = "") -> Path:
    """Store an area's results; `speed`: `machine_speed()` measured just before its run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = RESULTS / f"{area}.md"
    measured = f"; machine speed before the run: {speed}" if speed else ""
    path.write_text(f"## {area}\n\nCommand: `{command}` ({stamp}{measured})\n\n{body.strip()}\n")
    return path


def assemble() -> Path:
    """BENCHMARKS.md from every area's latest results."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    parts = [
        "# Benchmarks\n",
        "Produced by `make bench` (all areas) or `python -m bench <area>` (one area); medians over",
        "repeats, each compared with a baseline measured in the same run.\n",
        f"Machine: {machine()}. Commit: {commit}.\n",
    ]
    for area in AREAS:
        path = RESULTS / f"{area}.md"
        if path.exists():
            parts.append(path.read_text())
        else:
            parts.append(f"## {area}\n\nNot measured yet.\n")
    out = ROOT / "BENCHMARKS.md"
    out.write_text("\n".join(parts))
    return out


BENCH_KEY = "bench-service-key-0123456789"


class ServiceProcess:
    """A platform service as its own process on a free loopback port, as deployed.

    `settings` are its RLHF_* environment variables (host, port and broker are filled in);
    construction returns once the gRPC channel is ready.
    """

    def __init__(self, module: str, bootstrap: str, settings: dict[str, str]) -> None:
        import grpc

        from rlhf.auth import ClientSecurity, dial
        from rlhf.broker import free_port

        self.port = free_port()
        env = {
            **os.environ,
            "RLHF_KAFKA_BOOTSTRAP": bootstrap,
            "RLHF_GRPC_HOST": "127.0.0.1",
            "RLHF_GRPC_PORT": str(self.port),
            # The bench calls as the platform's own service (Score, Generate) and reads /metrics.
            "RLHF_SERVICE_KEYS": f"bench={BENCH_KEY}",
            "RLHF_METRICS_OPEN": "true",
            **settings,
        }
        # The service's log, for reading what it did while measured (e.g. a reload's split
        # between reading and building): bench/logs/<service>.log, overwritten each run.
        LOGS.mkdir(exist_ok=True)
        self.log_path = LOGS / f"{module.split('.')[-1]}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.channel = dial(f"127.0.0.1:{self.port}", ClientSecurity(key=BENCH_KEY))
        grpc.channel_ready_future(self.channel).result(timeout=300)

    def stop(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(60)
