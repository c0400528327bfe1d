"""`make up`: start the broker, every service and the simulated users, and watch the loop turn.

Each service runs as its own process, exactly as in a cluster, with its logs in `run/logs/`.
On a terminal a live panel shows the served policy, the thumbs-up rate and live reward per
policy version, KL, the feedback rate and the trainer's progress; otherwise a status line is
logged now and then. Prometheus (Debian's `prometheus`, if installed) scrapes every service with
the platform's alert rules. Ctrl-C (or SIGTERM) stops Prometheus, then the services in reverse
order, each draining its in-flight work, then the broker. However the launcher dies (SIGKILL, or its
output piped to a pager that exits), Linux stops every process it started (`die_with_parent`).

Every service is authenticated as in a cluster: the launcher makes fresh keys for each run (the
app key of tenant `local`, a service key for the trainer's calls, an operator key and a reader
key) and writes the ones people and apps use to `run/up.env` (mode 0600).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.live import Live
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from rlhf import bus
from rlhf.auth import ClientSecurity
from rlhf.broker import EmbeddedBroker, free_port
from rlhf.config import parse_args
from rlhf.local import (
    FEEDBACK_HTTP_PORT,
    HTTP_PORT,
    PLAYGROUND_PORT,
    PORTS,
    PortReservations,
    address_variable,
    die_with_parent,
    stop_on_signals,
)
from rlhf.watch import Watcher

from . import prometheus
from .config import LauncherConfig
from .view import line, panel

HEALTH_TIMEOUT = 600.0  # the first start converts the base model
PROMETHEUS_READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0  # SIGTERM to SIGKILL
# A trainer drains RPCs (10 s), then gives its running PPO iteration or reward or sft round up at
# the next step (the restarted stage reads its examples again) and finishes a checkpoint it is
# writing. A PPO iteration's scoring passes are not interrupted (a few seconds on 2 cores); the
# rest of the limit is room for a slow disk.
TRAINER_STOP_TIMEOUT = 150.0
# Sized for 2 CPU cores shared by everything. Serving comes first: the training processes run at
# lower scheduling priority (RLHF_NICE, which also sets each service's session autogroup: until
# 2026-12-06 it did not, and every service competed at equal weight) and every process has a
# thread budget (OMP_NUM_THREADS), so answers stay fast while PPO trains beside generation. The
# nice values are mild (5): generation is busy nearly all the time with six users, and at nice
# 15-19 the trainers got almost nothing once nice worked (no reward model after 6 minutes). The
# reward stage shares nice 5 with ppo: before its first model nothing else trains, and at nice
# 10 it got a third of what nice 5 gets (the first model came 10 minutes in). Once its first
# model is out it retrains on everything so far at geometrically spaced sizes (64, 128, 192,
# 288, 432... ratings): measured with fixed rounds of 64 it trained a round every minute, and
# PPO, at the same priority, took 4 minutes an update. The users rate fast enough for a trend
# to show. Any of these can be overridden from the environment.
CPU_DEMO: dict[str, dict[str, str]] = {
    # One thread: beside two niced trainers on 2 cores, a 2-thread decode waits at each op for
    # the worker a trainer holds. Measured (generation serving 5 clients, two torch hogs at
    # nice 5 and 10 in their own sessions, 75 s each): 32 tokens in 3.36 s at one thread (0.87
    # cores) against 3.59 s at two with PASSIVE waits (0.94), 3.64 s spinning (1.33 cores, the
    # hogs' throughput halved) and 4.24 s with GOMP_SPINCOUNT=2000. Dedicated cores (a
    # deployment): leave it unset.
    "generation": {"OMP_NUM_THREADS": "1"},
    # The trainer stages get one thread each too: beside one-thread generation, two trainer-like
    # hogs at nice 5 did 8.2 and 8.4 steps/s at one thread each against 3.2 and 3.2 at two (a
    # two-thread op waits for its slower half, and its workers spin meanwhile), and generation
    # answered a little faster (3.27 s against 3.41 s). With generation, ppo, the reward stage
    # and the reward service busy, one thread each still fills both cores.
    # Score every live answer (a few ms each at demo traffic), so the view's live reward per
    # policy version has numbers within minutes instead of a 10% sample's trickle.
    "reward": {
        "RLHF_REWARD_DRIFT_SAMPLE": "1.0",
        "RLHF_NICE": "5",
        "OMP_NUM_THREADS": "1",
        "RLHF_REWARD_MAX_TOKENS": "128",  # as the reward stage trains: the same for both
    },
    "trainer": {
        "RLHF_NICE": "5",
        "OMP_NUM_THREADS": "1",
        # Measured in an in-process replica of the loop (users rating the policy, the reward
        # model retrained on their ratings): batches of 16 with one epoch at lr 5e-4 reached 81%
        # held-out thumbs-up in 30 updates (batches of 8, two epochs at 2e-4: 67% in 60) but
        # ran past 12 nats of KL; 3e-4 with a 6-nat target and a short horizon holds it.
        # GRPO, 4 prompts x 4 answers (the 16 sequences of a PPO batch): in `python -m bench
        # loop` it took held-out thumbs-up from 34% to 77% in 30 minutes (20 updates, bf16
        # trainer; users rating sentiment alone); in float32 70% after 10. With users who also
        # rate off-topic answers down (2026-12-06), 28% to 55% (72% at 15 minutes), KL 5.8.
        # PPO, its value head learning from scratch beside the policy, reached 54% after 13
        # (float32, sentiment alone), but RLOO (GRPO's advantages times G/(G-1):
        # the same updates under AdamW) reached 56%: one run each does not rank algorithms
        # (BENCHMARKS.md). GRPO also has no value head to train, so its updates are cheaper.
        "RLHF_PPO_ALGORITHM": "grpo",
        "RLHF_PPO_BATCH_SIZE": "4",
        "RLHF_PPO_MINIBATCH_SIZE": "8",
        "RLHF_PPO_EPOCHS": "1",
        "RLHF_PPO_RESPONSE_TOKENS": "24",
        "RLHF_PPO_LORA_RANK": "16",
        "RLHF_PPO_LORA_ALPHA": "32",
        "RLHF_PPO_LEARNING_RATE": "3e-4",
        "RLHF_PPO_INIT_KL_COEF": "0.1",
        "RLHF_PPO_TARGET_KL": "6",
        # Updates come every ~16 s here (one thread per process): at a horizon of 200 the
        # coefficient had decayed to 0.05 by the time a new reward model pulled the KL from 2 to
        # 11 nats in 7 updates, and it climbed 1.6% an update (KL 9-18 for the next 30 updates,
        # answers shrinking to "I'm happy to help with a task."). With a floor at the initial
        # value and a horizon of 64 (5% an update) the next run's KL stayed at 3-8 nats (one
        # update at 11) over 72 updates, the coefficient between 0.10 and 0.17, and the answers
        # kept their length and topic.
        "RLHF_PPO_KL_HORIZON": "64",
        "RLHF_PPO_MIN_KL_COEF": "0.1",
    },
    "reward-trainer": {
        "RLHF_NICE": "5",
        "OMP_NUM_THREADS": "1",
        "RLHF_REWARD_ROUND_EXAMPLES": "64",
        "RLHF_REWARD_ROUND_GROWTH": "0.5",
        "RLHF_REWARD_LEARNING_RATE": "1e-4",
        "RLHF_REWARD_MAX_TOKENS": "128",
    },
    # With RLHF_UP_RELEASES: half the answers come from the candidate, so a canary gathers
    # thumbs at half make up's rating rate (about 27 a minute each; at the 10% default the
    # candidate would get 5 a minute). A policy is gated only 8 versions past the incumbent: a
    # GRPO update here gains about two points of thumbs-up, and the test tells 16 points apart
    # in about 200 thumbs a version, one point in thousands (docs/operations.md). A canary still
    # undecided after 10 minutes expires (the default is a day): the incumbent keeps serving
    # and the newest policy is gated next. The stage runs at nice 0: its gate is short, rare
    # (once a candidate) and holds up the canary; at nice 10 it took over 7 minutes, at 19 six.
    "release-trainer": {
        "OMP_NUM_THREADS": "1",
        "RLHF_CANARY_SHARE": "0.5",
        "RLHF_RELEASE_MAX_SECONDS": "600",
        "RLHF_RELEASE_MIN_AHEAD": "8",
    },
    "simulated-users": {
        # About 75 ratings a minute (measured): the first reward model passed its gate 2-6
        # minutes in. At a 6 s pause (40 a minute) it took 14 minutes (the gate needs held-out
        # ratings), and PPO was hardly faster (1.2-2.3 min an update against 1.5-2).
        "RLHF_SIM_USERS": "6",
        "RLHF_SIM_PAUSE_SECONDS": "3",
        "RLHF_SIM_MAX_NEW_TOKENS": "32",
    },
}


@dataclass(frozen=True)
class Keys:
    """The credentials of one `make up` run (fresh each run unless RLHF_UP_API_KEY is set)."""

    api: str  # tenant "local": apps, the playground's person, simulated users, `rlhf`
    service: str  # the trainer's calls to reward (Score)
    operator: str  # `rlhf pause / rollback ...`
    reader: str  # the view, the playground's panel, Prometheus

    @classmethod
    def new(cls, api_key: str = "") -> Keys:
        return cls(
            api_key or secrets.token_hex(16),
            secrets.token_hex(24),
            secrets.token_hex(24),
            secrets.token_hex(24),
        )

    def accepted(self) -> dict[str, str]:
        """The settings every service gets: the service, operator and reader keys it accepts."""
        return {
            "RLHF_SERVICE_KEYS": f"trainer={self.service}",
            "RLHF_OPERATOR_KEYS": f"local={self.operator}",
            "RLHF_READER_KEYS": f"watch={self.reader}",
        }


@dataclass
class Process:
    name: str
    command: list[str]
    grpc_port: int | None
    metrics_port: int | None
    env: dict[str, str]
    stop_timeout: float = STOP_TIMEOUT
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    def log_path(self, log_dir: Path) -> Path:
        return log_dir / f"{self.name}.log"

    def start(self, log_dir: Path) -> None:
        self.log = open(self.log_path(log_dir), "ab")  # noqa: SIM115 (closed in stop)
        defaults = CPU_DEMO.get(self.name, {})
        self.popen = subprocess.Popen(
            self.command,
            env={**defaults, **os.environ, **self.env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to the launcher, which stops us in order
            preexec_fn=die_with_parent(),  # and if the launcher dies, we go too
        )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.log is not None:
            self.log.close()


def last_log_line(path: Path, limit: int = 70) -> str:
    """The message of the newest line of a log, for the start-up progress."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
            lines = log.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    message = lines[-1].split(": ", 1)[-1] if lines else ""
    return message if len(message) <= limit else message[: limit - 3] + "..."


def wait_healthy(
    process: Process,
    log_dir: Path,
    stop: threading.Event,
    tick: Callable[[], None] = lambda: None,
    timeout: float = HEALTH_TIMEOUT,
) -> bool:
    """Block until the process answers the standard gRPC health check with SERVING; False if
    `stop` was set first. `tick` runs between checks (the progress display)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}")
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not process.alive():
                tail = process.log_path(log_dir).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{process.name} exited during start-up:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            tick()
            if stop.wait(0.5):
                return False
        raise TimeoutError(f"{process.name} did not become healthy in {timeout:.0f} s")
    finally:
        channel.close()


def _port(preferred: int) -> int:
    """For the broker and Prometheus, started when nothing else runs or on ports below the
    ephemeral range: `preferred` unless something listens there."""
    with socket.socket() as probe:
        busy = probe.connect_ex(("127.0.0.1", preferred)) == 0
    return free_port() if busy else preferred


def plan(
    bootstrap: str,
    model: str,
    reward_model: str,
    keys: Keys,
    id_key: str,
    take_port: Callable[[int], int],
    releases: bool = False,
) -> list[Process]:
    """The processes in start order, each with its own ports (`take_port(preferred)`, usually
    `PortReservations.take`) and settings; with `releases`, the release stage too, and generation
    serving what it releases."""
    common = {
        "RLHF_KAFKA_BOOTSTRAP": bootstrap,
        "RLHF_GRPC_HOST": "127.0.0.1",
        **keys.accepted(),
    }
    ports = {
        name: (take_port(grpc_port), take_port(metrics))
        for name, (grpc_port, metrics) in PORTS.items()
    }
    http_port = take_port(HTTP_PORT)
    feedback_http_port = take_port(FEEDBACK_HTTP_PORT)
    playground_port = take_port(PLAYGROUND_PORT)
    tenant_key = f"local={keys.api}"

    def service(name: str, extra: dict[str, str], module: str | None = None) -> Process:
        grpc_port, metrics_port = ports[name]
        env = {
            **common,
            "RLHF_GRPC_PORT": str(grpc_port),
            "RLHF_METRICS_PORT": str(metrics_port),
            **extra,
        }
        command = [sys.executable, "-m", module or f"services.{name}"]
        stop_timeout = TRAINER_STOP_TIMEOUT if "trainer" in name else STOP_TIMEOUT
        return Process(name, command, grpc_port, metrics_port, env, stop_timeout)

    release_stage = [
        service(
            "release-trainer",
            {
                "RLHF_TRAINER_STAGE": "release",
                "RLHF_POLICY_MODEL": model,  # the gate's reference
                "RLHF_REWARD_ADDRESS": f"127.0.0.1:{ports['reward'][0]}",  # scores the gate
                "RLHF_CLIENT_KEY": keys.service,
            },
            module="services.trainer",
        )
    ]
    return [
        service("reward", {"RLHF_REWARD_MODEL": reward_model}),
        service(
            "generation",
            {
                "RLHF_POLICY_MODEL": model,
                "RLHF_GENERATION_ID_KEY": id_key,
                "RLHF_HTTP_PORT": str(http_port),
                # Apps on the HTTP API (OpenAI, TGI) present the tenant's key, as for feedback.
                "RLHF_GENERATION_API_KEYS": tenant_key,
                **({"RLHF_GENERATION_RELEASES": "true"} if releases else {}),
            },
        ),
        service(
            "feedback",
            {
                "RLHF_GENERATION_ID_KEY": id_key,
                "RLHF_FEEDBACK_API_KEYS": tenant_key,
                "RLHF_FEEDBACK_HTTP_PORT": str(feedback_http_port),
            },
        ),
        service(
            "trainer",
            {
                "RLHF_POLICY_MODEL": model,
                "RLHF_REWARD_ADDRESS": f"127.0.0.1:{ports['reward'][0]}",
                # used with RLHF_PPO_ROLLOUTS=pool: rollouts decode in the users' batches
                "RLHF_PPO_POOL_ADDRESS": f"127.0.0.1:{ports['generation'][0]}",
                "RLHF_CLIENT_KEY": keys.service,
            },
        ),
        service(
            "reward-trainer",
            {"RLHF_TRAINER_STAGE": "reward", "RLHF_REWARD_MODEL": reward_model},
            module="services.trainer",
        ),
        *(release_stage if releases else []),
        service(
            "playground",
            {
                "RLHF_PLAYGROUND_PORT": str(playground_port),
                "RLHF_GENERATION_URL": f"http://127.0.0.1:{http_port}",
                "RLHF_FEEDBACK_URL": f"http://127.0.0.1:{feedback_http_port}/v1/feedback",
                "RLHF_GENERATION_ADDRESS": f"127.0.0.1:{ports['generation'][0]}",
                "RLHF_TRAINER_ADDRESS": f"127.0.0.1:{ports['trainer'][0]}",
                "RLHF_REWARD_TRAINER_ADDRESS": f"127.0.0.1:{ports['reward-trainer'][0]}",
                "RLHF_FEEDBACK_METRICS_URL": f"http://127.0.0.1:{ports['feedback'][1]}/metrics",
                "RLHF_CLIENT_KEY": keys.reader,  # the panel reads status and thumbs
            },
        ),
        Process(
            "simulated-users",
            [sys.executable, "-m", "services.simulated_users"],
            None,
            None,
            {
                "RLHF_GENERATION_ADDRESS": f"127.0.0.1:{ports['generation'][0]}",
                "RLHF_FEEDBACK_ADDRESS": f"127.0.0.1:{ports['feedback'][0]}",
                "RLHF_SIM_API_KEY": keys.api,
            },
        ),
    ]


def _playground_url(process: Process) -> str:
    return f"http://127.0.0.1:{process.env['RLHF_PLAYGROUND_PORT']}/"


def write_env(
    run_dir: Path, bootstrap: str, processes: list[Process], keys: Keys, extra: dict[str, str]
) -> Path:
    """Addresses and keys, for apps, scripts and the `rlhf` command line: the app key
    (generate, feedback), the operator key (pause, rollback) and the reader key (status,
    /metrics). The service key stays with the services."""
    lines = [
        f"RLHF_KAFKA_BOOTSTRAP={bootstrap}",
        f"RLHF_API_KEY={keys.api}",
        f"RLHF_OPERATOR_KEY={keys.operator}",
        f"RLHF_READER_KEY={keys.reader}",
    ]
    for process in processes:
        if process.grpc_port is not None:
            lines.append(f"{address_variable(process.name)}=127.0.0.1:{process.grpc_port}")
        if "RLHF_HTTP_PORT" in process.env:
            lines.append(f"RLHF_TGI_URL=http://127.0.0.1:{process.env['RLHF_HTTP_PORT']}")
            lines.append(
                f"RLHF_OPENAI_BASE_URL=http://127.0.0.1:{process.env['RLHF_HTTP_PORT']}/v1"
            )
        if "RLHF_PLAYGROUND_PORT" in process.env:
            lines.append(f"RLHF_PLAYGROUND_URL={_playground_url(process)}")
        if "RLHF_FEEDBACK_HTTP_PORT" in process.env:
            port = process.env["RLHF_FEEDBACK_HTTP_PORT"]
            lines.append(f"RLHF_FEEDBACK_URL=http://127.0.0.1:{port}/v1/feedback")
    lines += [f"{name}={value}" for name, value in extra.items()]
    path = run_dir / "up.env"
    # Created private, not made private after the keys are already in it.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


class Launcher:
    """Starts and stops the platform and shows it: a live panel, or plain log lines."""

    def __init__(self, config: LauncherConfig, console: Console, stop: threading.Event) -> None:
        self.config = config
        self.console = console
        self.stop = stop
        self.live = config.view == "live" or (config.view == "auto" and console.is_terminal)
        self.log_dir = config.run_dir / "logs"
        self.processes: list[Process] = []
        self.keys = Keys.new(config.api_key)
        self.prometheus: Process | None = None
        self.prometheus_url = ""

    def say(self, text: str) -> None:
        # No wrapping or markup: plain mode output is read by people and by scripts alike.
        try:
            self.console.print(text, soft_wrap=True, markup=False, highlight=False)
        except (BrokenPipeError, OSError):  # the reader (a pager, `tee`) left: stop, in order
            self.stop.set()

    def _announce(self, process: Process) -> None:
        if process.grpc_port is None:
            self.say(f"{process.name:<15} running")
            return
        self.say(
            f"{process.name:<15} grpc://127.0.0.1:{process.grpc_port}  "
            f"metrics http://127.0.0.1:{process.metrics_port}/metrics"
        )
        if "RLHF_HTTP_PORT" in process.env:
            http = process.env["RLHF_HTTP_PORT"]
            self.say(f"{'':<15} OpenAI chat completions http://127.0.0.1:{http}/v1 (API key below)")
            self.say(f"{'':<15} TGI-compatible HTTP API http://127.0.0.1:{http}/")
        if "RLHF_PLAYGROUND_PORT" in process.env:
            self.say(f"{'':<15} chat page {_playground_url(process)} (sign in with the API key)")
        if "RLHF_FEEDBACK_HTTP_PORT" in process.env:
            http = process.env["RLHF_FEEDBACK_HTTP_PORT"]
            self.say(f"{'':<15} HTTP JSON API http://127.0.0.1:{http}/v1/feedback")

    def _wait(self, process: Process) -> bool:
        """Wait for a service; on a terminal with a spinner, its time and newest log line."""
        if not self.live:
            return wait_healthy(process, self.log_dir, self.stop)
        columns = (
            SpinnerColumn(),
            TextColumn("[bold]starting {task.fields[name]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}", markup=False, style="dim"),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task("", name=process.name, detail="")

            def tick() -> None:
                detail = last_log_line(process.log_path(self.log_dir))
                progress.update(task, detail=detail)

            return wait_healthy(process, self.log_dir, self.stop, tick)

    def start_services(self, bootstrap: str, keys: Keys) -> bool:
        """Start every process in order; False if stopped before all were healthy."""
        id_key = self.config.generation_id_key or secrets.token_hex(32)
        config = self.config
        ports = PortReservations()
        try:
            self.processes = plan(
                bootstrap,
                config.policy_model,
                config.reward_model,
                keys,
                id_key,
                ports.take,
                config.releases,
            )
            for process in self.processes:
                process.start(self.log_dir)
                if process.grpc_port is not None and not self._wait(process):
                    return False
                self._announce(process)
        finally:
            ports.release()
        return not self.stop.is_set()

    def start_prometheus(self) -> None:
        if not self.config.prometheus:
            return
        if prometheus.binary() is None:
            self.say("prometheus      not installed (Debian: apt-get install prometheus), skipped")
            return
        port = _port(self.config.prometheus_port)
        targets = {p.name: p.metrics_port for p in self.processes if p.metrics_port is not None}
        command = prometheus.command(self.config.run_dir, port, targets, self.keys.reader)
        self.prometheus = Process("prometheus", command, None, port, {})
        self.prometheus.start(self.log_dir)
        if prometheus.ready(port, PROMETHEUS_READY_TIMEOUT):
            self.prometheus_url = f"http://127.0.0.1:{port}"
            rules = "alert rules loaded" if prometheus.RULES.exists() else "no alert rules found"
            self.say(f"{'prometheus':<15} {self.prometheus_url}  ({rules})")
        else:
            self.say(f"prometheus      did not start, see {self.prometheus.log_path(self.log_dir)}")

    def _dead(self) -> list[str]:
        return [p.name for p in self.processes if not p.alive()]

    def watch(self) -> None:
        """Show the loop until Ctrl-C or a service dies."""
        watcher = Watcher(
            {p.name: f"127.0.0.1:{p.grpc_port}" for p in self.processes if p.grpc_port},
            {
                p.name: f"http://127.0.0.1:{p.metrics_port}/metrics"
                for p in self.processes
                if p.metrics_port
            },
            ClientSecurity(key=self.keys.reader),
        )
        try:
            if self.live:
                self._watch_live(watcher)
            else:
                self._watch_plain(watcher)
        finally:
            watcher.close()
        dead = self._dead()
        if dead:
            self.say(f"stopped unexpectedly: {', '.join(dead)} (see {self.log_dir}/)")

    def _watch_live(self, watcher: Watcher) -> None:
        started = time.monotonic()
        footer = " · ".join(
            part
            for part in (
                f"Prometheus {self.prometheus_url}" if self.prometheus_url else "",
                f"logs {self.log_dir}/",
                "rlhf status",
                "Ctrl-C stops everything",
            )
            if part
        )
        with Live(console=self.console, auto_refresh=False) as view:
            while not self._dead():
                shot = watcher.snapshot()
                view.update(panel(shot, footer, time.monotonic() - started), refresh=True)
                if self.stop.wait(self.config.refresh_seconds):
                    return

    def _watch_plain(self, watcher: Watcher) -> None:
        while not self.stop.wait(self.config.status_every_seconds) and not self._dead():
            self.say(f"{time.strftime('%H:%M:%S')} {line(watcher.snapshot())}")

    def run(self, bootstrap: str) -> bool:
        """Start everything, then watch until Ctrl-C; False if a service stopped on its own."""
        if not self.start_services(bootstrap, self.keys):
            return True  # Ctrl-C during start-up
        self.start_prometheus()
        extra = {"RLHF_PROMETHEUS_URL": self.prometheus_url} if self.prometheus_url else {}
        env_file = write_env(self.config.run_dir, bootstrap, self.processes, self.keys, extra)
        self.say(
            f"API key: tenant 'local', key {self.keys.api} (operator and reader keys and all "
            f"addresses in {env_file})"
        )
        self.say(f"logs in {self.log_dir}/ ; Ctrl-C stops everything")
        self.watch()
        return not self._dead()

    def stop_all(self) -> None:
        """Prometheus, then the services in reverse start order (a trainer gives its running
        update or round up at its next step, and finishes a checkpoint it is writing)."""
        stopping = [self.prometheus] if self.prometheus is not None else []
        for process in stopping + list(reversed(self.processes)):
            if process.popen is None:  # Ctrl-C came before it was started
                continue
            if process.stop_timeout > STOP_TIMEOUT and process.alive():
                self.say(f"  stopping {process.name} (after the step it is on) ...")
            started = time.monotonic()
            process.stop()
            self.say(f"  {process.name} stopped ({time.monotonic() - started:.1f} s)")


def main() -> None:
    config = parse_args(LauncherConfig, __doc__)
    log_dir = config.run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # SIGHUP too: a closed terminal stops everything in order (services, then the broker),
    # not all at once through each child's die-with-parent signal.
    stop = stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

    launcher = Launcher(config, Console(), stop)
    broker = EmbeddedBroker(
        port=_port(config.broker_port), log_path=log_dir / "broker.log", die_with_parent=True
    )
    broker.start()
    bus.ensure_topics(broker.bootstrap)
    launcher.say(
        f"{'broker':<15} kafka://{broker.bootstrap}  (topics: {', '.join(bus.ALL_TOPICS)})"
    )
    failed = False
    try:
        failed = not launcher.run(broker.bootstrap)
    except (RuntimeError, TimeoutError) as exc:  # a service that cannot start: its log says why
        launcher.say(str(exc))
        failed = True
    finally:
        launcher.say("stopping ...")
        launcher.stop_all()
        broker.stop()
        launcher.say("stopped cleanly")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
