"""Feedback ingestion: StreamFeedback throughput next to a raw producer, SubmitFeedback latency.

Everything runs on this machine: an embedded broker, the feedback service as its own process
(`python -m services.feedback`, as in production) and the client here. Throughput counts only
events the broker acknowledged (acks=all) and the service reported stored; the baseline is a bare
kafka-python producer (acks=all, idempotent, same linger) sending the same serialized events in
the same run. Latency is measured open loop: requests are sent on a fixed schedule whatever the
replies do, and each latency runs from the scheduled send time (no coordinated omission).
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaProducer

from bench.report import median, percentile, repeat, table
from rlhf import bus
from rlhf.broker import EmbeddedBroker, free_port
from rlhf.ids import GenerationIdSigner, partition_key, prompt_digest
from rlhf.server import settle_heap
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

ID_KEY = "bench-generation-id-key-0123456789"
API_KEY = "bench-api-key-0123456789"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
SIGNER = GenerationIdSigner(ID_KEY.encode())
LINGER_MS = 2  # the service's default (RLHF_FEEDBACK_LINGER_MS), used for the baseline too
STREAM_ITEMS = 10_000  # items per StreamFeedback call (the service's default limit)
TARGET_RATE, TARGET_SHARE, TARGET_P99_MS = 10_000, 0.75, 20.0  # the share: issue 18


@dataclass(frozen=True)
class Throughput:
    rate: float  # events/s
    cpu_us: float  # CPU time of the producing process (producer or service) per event


@dataclass(frozen=True)
class Plan:
    events: int  # per throughput run
    repeats: int
    latency_seconds: float  # per latency run, after a one second warm-up

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        return cls(20_000, 2, 3.0) if quick else cls(60_000, 5, 10.0)


def _feedback(count: int) -> list[events_pb2.Feedback]:
    """Fresh submissions (new keys each run, so the service's resend memory never answers)."""
    run = uuid.uuid4().hex[:8]
    # As the generation service issues them: bound to their prompt, whose digest is the key.
    ids = [SIGNER.issue(1, prompt_hash=prompt_digest(f"prompt {n % 16}")) for n in range(64)]
    return [
        events_pb2.Feedback(
            generation_id=ids[n % len(ids)],
            idempotency_key=f"bench-{run}-{n}",
            thumb=events_pb2.THUMB_UP if n % 3 else events_pb2.THUMB_DOWN,
        )
        for n in range(count)
    ]


def _events(feedback: list[events_pb2.Feedback]) -> list[tuple[str, events_pb2.FeedbackEvent]]:
    """The (key, event) records the service would publish for `feedback` (keyed, as the
    service keys them, by the prompt digest bound into the generation id)."""
    records = []
    for item in feedback:
        event = events_pb2.FeedbackEvent(
            event_id=uuid.uuid4().hex, tenant="bench", feedback=item, policy_version=1
        )
        event.received_at.GetCurrentTime()
        records.append((partition_key(item.generation_id), event))
    return records


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_producer_rate(bootstrap: str, events: int) -> Throughput:
    """Events/s of a bare kafka-python producer, acks=all, every future checked, and the CPU
    this process spent per event (the producer's caller and I/O threads)."""
    records = [
        (key.encode(), event.SerializeToString()) for key, event in _events(_feedback(events))
    ]
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=LINGER_MS
    )
    try:
        producer.send(bus.FEEDBACK, key=b"warm-up", value=b"").get(10)
        return _send_rate(
            lambda: [producer.send(bus.FEEDBACK, key=k, value=v) for k, v in records],
            producer.flush,
        )
    finally:
        producer.close(5)


def _send_rate(send: Callable[[], list[Any]], flush: Callable[[float], None]) -> Throughput:
    """Events/s and this process's CPU per event of `send()` queueing every event (it returns
    their futures), then `flush`, every future checked."""
    cpu, started = _own_cpu(), time.perf_counter()
    futures = send()
    flush(60)
    for future in futures:
        future.get(0)
    elapsed, cpu = time.perf_counter() - started, _own_cpu() - cpu
    return Throughput(len(futures) / elapsed, 1e6 * cpu / len(futures))


def publisher_rate(bootstrap: str, events: int) -> Throughput:
    """Events/s of the platform's own producer (`rlhf.bus.Publisher`, as the feedback service
    builds it) publishing the same events bare: what the service adds to it is its own cost."""
    records = _events(_feedback(events))
    publisher = bus.Publisher(bootstrap, client_id="bench-publisher", linger_ms=LINGER_MS)
    try:
        publisher.publish(bus.FEEDBACK, "warm-up", records[0][1])
        return _send_rate(
            lambda: [publisher.publish_async(bus.FEEDBACK, k, event) for k, event in records],
            publisher.flush,
        )
    finally:
        publisher.close()


def stream_rate(
    stub: feedback_pb2_grpc.FeedbackServiceStub, events: int, per_message: int, service_pid: int
) -> Throughput:
    """Events/s through StreamFeedback, counting only items the reply says were stored, and the
    CPU the service process spent per event."""
    feedback = _feedback(events)
    messages = [
        feedback_pb2.StreamFeedbackRequest(items=feedback[n : n + per_message])
        for n in range(0, events, per_message)
    ]
    per_stream = max(1, STREAM_ITEMS // per_message)
    stored = 0
    cpu, started = _process_cpu(service_pid), time.perf_counter()
    for first in range(0, len(messages), per_stream):
        reply = stub.StreamFeedback(iter(messages[first : first + per_stream]), metadata=AUTH)
        stored += reply.stored
    elapsed = time.perf_counter() - started
    cpu = _process_cpu(service_pid) - cpu
    if stored != events:
        raise RuntimeError(f"only {stored} of {events} events were stored")
    return Throughput(events / elapsed, 1e6 * cpu / events)


@dataclass(frozen=True)
class LatencyRun:
    achieved_rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int


def unary_latency(
    stub: feedback_pb2_grpc.FeedbackServiceStub, rate: float, seconds: float
) -> LatencyRun:
    """SubmitFeedback sent open loop at `rate`/s; latencies after a one second warm-up."""
    total = int(rate * (seconds + 1.0))
    requests = [feedback_pb2.SubmitFeedbackRequest(feedback=f) for f in _feedback(total)]
    latencies: list[float] = []
    errors = [0]
    lock, done = threading.Lock(), threading.Semaphore(0)
    warm_up = int(rate)

    def on_done(index: int, scheduled: float) -> object:
        def record(future: grpc.Future) -> None:
            finished = time.perf_counter()
            with lock:
                if future.exception() is not None:
                    errors[0] += 1
                elif index >= warm_up:
                    latencies.append(finished - scheduled)
            done.release()

        return record

    # The requests built above would otherwise be scanned by every full collection here, and a
    # pause of this client's (tens of ms with 10k+ requests alive) would count as latency.
    settle_heap()
    try:
        start = time.perf_counter() + 0.05
        for index, request in enumerate(requests):
            scheduled = start + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            future = stub.SubmitFeedback.future(request, metadata=AUTH, timeout=10)
            future.add_done_callback(on_done(index, scheduled))
        sent_for = time.perf_counter() - start
        for _ in requests:
            done.acquire(timeout=15)
    finally:
        gc.unfreeze()
    milliseconds = [1000 * latency for latency in latencies] or [float("nan")]
    return LatencyRun(
        achieved_rate=total / sent_for,
        p50_ms=percentile(milliseconds, 50),
        p99_ms=percentile(milliseconds, 99),
        max_ms=max(milliseconds),
        errors=errors[0],
    )


@contextlib.contextmanager
def feedback_service(bootstrap: str) -> Iterator[tuple[int, int]]:
    """The service as its own process, as deployed; yields (its gRPC port, its pid)."""
    port = free_port()
    env = {
        **os.environ,
        "RLHF_KAFKA_BOOTSTRAP": bootstrap,
        "RLHF_GRPC_HOST": "127.0.0.1",
        "RLHF_GRPC_PORT": str(port),
        "RLHF_METRICS_PORT": "0",
        "RLHF_GENERATION_ID_KEY": ID_KEY,
        "RLHF_FEEDBACK_API_KEYS": f"bench={API_KEY}",
        "RLHF_FEEDBACK_RATE_PER_TENANT": "0",  # ingestion speed, not the per-tenant limit
    }
    with tempfile.NamedTemporaryFile(prefix="bench-feedback-", suffix=".log") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.feedback"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            _wait_serving(port, process, log.name)
            yield port, process.pid
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_serving(port: int, process: subprocess.Popen[bytes], log_name: str) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"feedback service exited: {Path(log_name).read_text()[-2000:]}")
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise RuntimeError("feedback service did not become healthy in 60 s")


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _throughput_section(
    raw: list[Throughput],
    publisher: list[Throughput],
    batched: list[Throughput],
    single: list[Throughput],
) -> str:
    baseline = median([r.rate for r in raw])
    own = median([r.rate for r in publisher])

    def row(path: str, runs: list[Throughput]) -> list[str]:
        rate = median([r.rate for r in runs])
        return [
            path,
            _rate(rate),
            f"{rate / baseline:.2f}",
            f"{rate / own:.2f}",
            f"{median([r.cpu_us for r in runs]):.0f} ({1e6 / rate:.0f})",
            _runs([r.rate for r in runs]),
        ]

    rows = [
        row("raw kafka-python producer (acks=all): baseline", raw),
        row("the service's producer (`rlhf.bus.Publisher`), bare", publisher),
        row("StreamFeedback, 100 items per message", batched),
        row("StreamFeedback, 1 item per message", single),
    ]
    batched_rate = median([r.rate for r in batched])
    share = batched_rate / baseline
    return (
        "### Sustained ingestion (events acknowledged by the broker)\n\n"
        + table(
            [
                "path",
                "events/s (median)",
                "vs raw producer",
                "vs the service's producer",
                "CPU us per event, producing process (wall us)",
                "runs (events/s)",
            ],
            rows,
        )
        + "\n\nThe raw producer is kafka-python as it comes, with the service's settings "
        "(acks=all, idempotent, same linger). The service's producer is the same client as the "
        "platform's one Kafka wrapper builds it: it wakes its I/O thread once per batch, not "
        "for every record queued behind one (`rlhf.bus.wake_sender_once_per_batch`), and hashes "
        "keys with a faster murmur2. CPU per event is that of the process holding the producer: "
        "the bench's for the two bare producers, the feedback service's for StreamFeedback "
        "(gRPC, authentication, validation, id verification, deduplication, publishing, "
        "per-item results). When it matches the wall time per event, that process is running "
        "one core flat out: its Python threads share one interpreter lock.\n\n"
        + f"Targets, with batched messages: at least {_rate(TARGET_RATE)} events/s: "
        + f"**{_verdict(batched_rate >= TARGET_RATE)}** ({_rate(batched_rate)}); at least "
        + f"{TARGET_SHARE:.0%} of the raw producer: **{_verdict(share >= TARGET_SHARE)}** "
        + f"({share:.0%}; {batched_rate / own:.0%} of the service's own producer, bare)."
        + _crc_note()
    )


def _crc_note() -> str:
    """Say so when kafka-python checksums record batches in pure Python (about 30 us/record)."""
    from kafka.record import util

    if getattr(util, "crc32c_c", None) is not None:
        return ""
    return (
        " kafka-python computed CRC32C in pure Python in this run (the `crc32c` package is not "
        "installed), which caps both the baseline and the service."
    )


def _latency_section(runs: list[LatencyRun]) -> str:
    rows = [
        [
            str(n + 1),
            _rate(run.achieved_rate),
            f"{run.p50_ms:.2f}",
            f"{run.p99_ms:.2f}",
            f"{run.max_ms:.2f}",
            str(run.errors),
        ]
        for n, run in enumerate(runs)
    ]
    p99 = median([run.p99_ms for run in runs])
    errors = sum(run.errors for run in runs)
    verdict = _verdict(p99 < TARGET_P99_MS and errors == 0)
    return (
        "### SubmitFeedback latency at 1,000 requests/s (open loop)\n\n"
        + table(["run", "sent req/s", "p50 ms", "p99 ms", "max ms", "errors"], rows)
        + f"\n\nMedian p99: {p99:.2f} ms; target under {TARGET_P99_MS:.0f} ms: **{verdict}**."
    )


def _runs(values: list[float]) -> str:
    return ", ".join(_rate(v) for v in values)


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _measure(
    stub: feedback_pb2_grpc.FeedbackServiceStub, service_pid: int, bootstrap: str, plan: Plan
) -> str:
    stream_rate(stub, 2_000, 100, service_pid)  # warm-up: connections, producer, code paths
    raw: list[Throughput] = []
    publisher: list[Throughput] = []
    batched: list[Throughput] = []
    single: list[Throughput] = []
    for _ in range(plan.repeats):  # interleaved, so drift hits every path alike
        raw.append(raw_producer_rate(bootstrap, plan.events))
        publisher.append(publisher_rate(bootstrap, plan.events))
        batched.append(stream_rate(stub, plan.events, 100, service_pid))
        single.append(stream_rate(stub, plan.events // 4, 1, service_pid))
    latency = repeat(lambda: unary_latency(stub, 1000.0, plan.latency_seconds), plan.repeats)
    throughput = _throughput_section(raw, publisher, batched, single)
    return "\n\n".join([throughput, _latency_section(latency)])


def run(quick: bool) -> str:
    plan = Plan.for_mode(quick)
    with (
        EmbeddedBroker(create_topics=True) as broker,
        feedback_service(broker.bootstrap) as (port, pid),
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        results = _measure(stub, pid, broker.bootstrap, plan)
    setup = (
        f"{plan.events:,} events per throughput run, {plan.repeats} runs per path, "
        f"{plan.latency_seconds:.0f} s per latency run; broker (Tansu, in memory), service "
        "process and client share this machine."
    )
    return f"{setup}\n\n{results}"
