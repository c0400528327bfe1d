"""A stop request never freezes a process: signals arriving in bursts, while the main thread
waits on the very event they set, still stop it (setting the event inside the Python signal
handler deadlocked there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import sys, time
    from rlhf.local import stop_on_signals

    stop = stop_on_signals(lambda sig: print("got", sig.name, flush=True))
    print("ready", flush=True)
    while not stop.wait(0.0001):  # the main thread spends its time inside the event's lock
        pass
    print("stopped", flush=True)
    time.sleep(0.5)  # signals still in flight land here, not in the interpreter's shutdown
    """
)


def _child() -> subprocess.Popen:
    libs = Path(__file__).resolve().parents[2] / "libs"
    env = {**os.environ, "PYTHONPATH": f"{libs}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def test_a_burst_of_signals_stops_the_process_every_time():
    for _ in range(5):
        child = _child()
        for _ in range(50):
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=20)
        assert child.returncode == 0
        assert out.count("stopped") == 1  # (its line may interleave with the watcher's prints)
        assert "got SIGTERM" in out


def test_one_signal_is_reported_once_and_stops():
    child = _child()
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=20)
    assert out.split() == ["got", "SIGINT", "stopped"]
