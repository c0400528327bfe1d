"""`make up` as a user runs it: every service as its own process, the loop turning, Prometheus
scraping them, Ctrl-C; then a second run on a terminal (the live view) on the same run and
checkpoint folders."""

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from rlhf.auth import ClientSecurity, dial
from rlhf.v1 import generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from rlhf.watch import Snapshot, version_rows
from services.launcher import prometheus
from services.launcher.view import line, panel
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = [sys.executable, "-m", "services.launcher"]


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split())


def _served_version(address: str, key: str) -> int:
    with dial(address, ClientSecurity(key=key)) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        return stub.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest(), timeout=5).version


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One run folder and checkpoint store for both runs: the second continues the first."""
    root = tmp_path_factory.mktemp("up")
    return {
        "RLHF_CHECKPOINT_DIR": str(root / "checkpoints"),
        "RLHF_UP_RUN_DIR": str(root / "run"),
        "RLHF_POLICY_MODEL": "tiny-random",
        # The plumbing of `make up` on tiny models: PPO may train on the untrained reward head
        # (with SmolLM2 it waits for the first reward model; tests/e2e/test_loop.py pins that).
        "RLHF_PPO_MIN_REWARD_VERSION": "0",
        "RLHF_REWARD_MODEL": "tiny-random",
        "RLHF_SIM_PAUSE_SECONDS": "0.2",
        "RLHF_SIM_USERS": "2",
    }


def _prometheus_checks(url: str, jobs: set[str]) -> None:
    """Every service is a healthy target and the platform's alert rules are loaded."""

    def healthy() -> set[str]:
        targets = _get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
        return {t["labels"]["job"] for t in targets if t["health"] == "up"}

    assert wait_until(lambda: healthy() == jobs, timeout=60, interval=1), healthy()
    groups = _get_json(f"{url}/api/v1/rules")["data"]["groups"]
    rules = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"ThumbsUpRateDrop", "RewardHackingSuspected"} <= rules


def test_up_runs_the_loop_and_stops_cleanly_on_ctrl_c(folders):
    env = {**os.environ, **folders, "RLHF_UP_STATUS_EVERY_SECONDS": "5"}
    launcher = subprocess.Popen(
        LAUNCHER, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    try:
        for text in launcher.stdout:
            output.append(text)
            if "Ctrl-C stops everything" in text:
                break
        assert launcher.poll() is None, "".join(output)
        addresses = _read_env(Path(folders["RLHF_UP_RUN_DIR"]) / "up.env")
        for name in ("GENERATION", "FEEDBACK", "REWARD", "TRAINER", "REWARD_TRAINER", "PLAYGROUND"):
            with grpc.insecure_channel(addresses[f"RLHF_{name}_ADDRESS"]) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        auth = {"authorization": f"Bearer {addresses['RLHF_API_KEY']}"}
        tgi = requests.post(
            addresses["RLHF_TGI_URL"] + "/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}},
            headers=auth,
            timeout=60,
        )
        assert tgi.status_code == 200
        assert requests.get(addresses["RLHF_TGI_URL"] + "/info", timeout=10).status_code == 401
        page = requests.get(addresses["RLHF_PLAYGROUND_URL"], timeout=10)
        assert page.status_code == 200 and "rlhf playground" in page.text
        thumb = requests.post(
            addresses["RLHF_FEEDBACK_URL"],
            json={
                "generationId": tgi.json()["generation_id"],
                "idempotencyKey": "launcher-test",
                "thumb": "THUMB_UP",
            },
            headers=auth,
            timeout=30,
        )
        assert thumb.status_code == 200, thumb.text
        if prometheus.binary() is not None:
            assert f"prometheus      {addresses['RLHF_PROMETHEUS_URL']}" in "".join(output)
            jobs = {"generation", "feedback", "reward", "trainer", "reward-trainer", "playground"}
            _prometheus_checks(addresses["RLHF_PROMETHEUS_URL"], jobs)
        generation, reader = addresses["RLHF_GENERATION_ADDRESS"], addresses["RLHF_READER_KEY"]
        assert wait_until(
            lambda: _served_version(generation, reader) >= 2, timeout=240, interval=1
        ), "the served policy version did not increase"
        # The control plane is closed to callers without the operator key up.env holds.
        trainer = addresses["RLHF_TRAINER_ADDRESS"]
        with dial(trainer, ClientSecurity(key=addresses["RLHF_READER_KEY"])) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                trainer_pb2_grpc.TrainerServiceStub(channel).Pause(
                    trainer_pb2.PauseRequest(), timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (Path(folders["RLHF_UP_RUN_DIR"]) / "up.env").stat().st_mode & 0o077 == 0
    finally:
        launcher.send_signal(signal.SIGINT)
        started = time.monotonic()
        rest, _ = launcher.communicate(timeout=120)
    output.append(rest)
    assert launcher.returncode == 0, "".join(output)
    assert "stopped cleanly" in rest
    assert time.monotonic() - started < 120
    # The plain view logged the loop: served version, trainer, thumbs-up per policy version.
    status = [t for t in output if re.match(r"\d\d:\d\d:\d\d served policy v\d+ \| trainer", t)]
    assert status and "thumbs-up v" in "".join(status), "".join(output)
    logs = Path(folders["RLHF_UP_RUN_DIR"]) / "logs"
    for name in ("generation", "feedback", "reward", "trainer"):
        text = (logs / f"{name}.log").read_text()
        assert "received SIGTERM, draining" in text and f"{name} stopped" in text, text[-2000:]
        assert "Traceback" not in text, text[-3000:]


class Terminal:
    """A process on a pseudo-terminal (120 x 40), its output collected as it comes."""

    def __init__(self, argv, env):
        master, child = os.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=child, stdout=child, stderr=child, close_fds=True
        )
        os.close(child)
        self._master = master
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: the child side closed
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    @property
    def text(self) -> str:
        raw = b"".join(self._chunks).decode(errors="replace")
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # colours and cursor moves

    def close(self):
        self._reader.join(timeout=10)
        os.close(self._master)


def test_second_up_on_a_terminal_shows_the_live_view_and_stops_when_the_terminal_closes(folders):
    run_dir = Path(folders["RLHF_UP_RUN_DIR"])
    first_run = _read_env(run_dir / "up.env")
    logs = run_dir / "logs"
    before = {name: (logs / f"{name}.log").stat().st_size for name in ("trainer", "generation")}
    env = {**os.environ, **folders, "TERM": "xterm-256color", "RLHF_UP_REFRESH_SECONDS": "1"}
    env.pop("NO_COLOR", None)
    terminal = Terminal(LAUNCHER, env)
    try:
        # The panel with the served policy (the newest of the first run, or newer), the trainer
        # and a thumbs-up bar for some policy version.
        assert wait_until(
            lambda: (
                "rlhf · make up" in terminal.text
                and re.search(r"v\d+\s+\d+\s+[█░]+", terminal.text)
            ),
            timeout=240,
            interval=1,
        ), terminal.text[-3000:]
        text = terminal.text
        assert "served policy" in text and "trainer" in text and "live reward" in text
        served = int(re.search(r"served policy\s+v(\d+)", text).group(1))
        assert served >= 2, text[-3000:]  # continued from the first run's policies
        second_run = _read_env(run_dir / "up.env")
        assert second_run["RLHF_API_KEY"] != first_run["RLHF_API_KEY"]
        if prometheus.binary() is not None:  # on the same storage as the first run's
            assert f"Prometheus {second_run['RLHF_PROMETHEUS_URL']}" in text
    finally:
        # A closed terminal (SIGHUP) stops everything in order, as Ctrl-C does (the plain test).
        terminal.process.send_signal(signal.SIGHUP)
        code = terminal.process.wait(timeout=120)
        terminal.close()
    assert code == 0, terminal.text[-3000:]
    assert "stopped cleanly" in terminal.text
    for name, offset in before.items():  # this run's lines: the services were stopped in turn
        with open(logs / f"{name}.log", "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        assert "received SIGTERM, draining" in text and f"{name} stopped" in text, text[-2000:]
        assert "Traceback" not in text, text[-3000:]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killing_the_launcher_leaves_no_service_running(tmp_path):
    """SIGKILL, as when `make up`'s output was piped to a pager that exited and the launcher
    was killed: Linux stops every process it started (the broker, the services, the users)."""
    env = {
        **os.environ,
        "RLHF_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "RLHF_UP_RUN_DIR": str(tmp_path / "run"),
        "RLHF_POLICY_MODEL": "tiny-random",
        "RLHF_REWARD_MODEL": "tiny-random",
        "RLHF_UP_PROMETHEUS": "false",
        "RLHF_UP_VIEW": "plain",
    }
    launcher = subprocess.Popen(
        LAUNCHER, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    children: list[int] = []
    try:
        for text in launcher.stdout:
            output.append(text)
            if "Ctrl-C stops everything" in text:
                break
        assert launcher.poll() is None, "".join(output)
        children = _children(launcher.pid)
        # The broker, six services and the simulated users.
        assert len(children) >= 8, (children, "".join(output))
    finally:
        launcher.kill()
        launcher.wait(timeout=30)
    assert wait_until(lambda: not any(_running(pid) for pid in children), timeout=120), [
        pid for pid in children if _running(pid)
    ]


def _exposition(lines):
    return "\n".join(lines) + "\n"


def test_view_reads_thumbs_and_live_reward_per_policy_version():
    feedback = _exposition(
        [
            "# TYPE rlhf_feedback_thumbs counter",
            'rlhf_feedback_thumbs_total{tenant="a",policy_version="1",thumb="up"} 2.0',
            'rlhf_feedback_thumbs_total{tenant="b",policy_version="1",thumb="up"} 1.0',
            'rlhf_feedback_thumbs_total{tenant="a",policy_version="1",thumb="down"} 1.0',
            'rlhf_feedback_thumbs_total{tenant="a",policy_version="0",thumb="down"} 4.0',
        ]
    )
    reward = _exposition(
        [
            "# TYPE rlhf_reward_live summary",
            'rlhf_reward_live_count{policy_version="1",reward_version="0"} 2.0',
            'rlhf_reward_live_sum{policy_version="1",reward_version="0"} 1.0',
            'rlhf_reward_live_count{policy_version="2",reward_version="0"} 1.0',
            'rlhf_reward_live_sum{policy_version="2",reward_version="0"} -0.5',
        ]
    )
    rows = version_rows(feedback, reward)
    assert [(r.version, r.thumbs, r.up_rate, r.live_reward) for r in rows] == [
        (0, 4, 0.0, None),
        (1, 4, 0.75, 0.5),
        (2, 0, None, -0.5),
    ]
    shot = Snapshot(
        ppo=trainer_pb2.TrainerStatus(step=3, policy_version=1, kl=0.0123, paused=True),
        versions=rows,
        feedback_total=8,
        feedback_per_minute=4.0,
        missing=["reward-trainer"],
    )
    console = Console(record=True, width=100)
    console.print(panel(shot, "Ctrl-C stops everything", uptime=75))
    shown = console.export_text()
    assert "up 1:15" in shown and "step 3 · published v1" in shown and "KL 0.0123" in shown
    assert "· paused" in shown and "4.0 / min · 8 stored" in shown
    assert "████████░░  75%" in shown and "+0.50" in shown
    assert "not answering: reward-trainer" in shown
    assert "thumbs-up v0 0% of 4, v1 75% of 4" in line(shot)
