"""Prometheus for `make up`: Debian's `prometheus` binary, scraping every service, with the
platform's alert rules, its data under the run directory."""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"
SCRAPE_INTERVAL = "5s"  # a local demo: the view and the graphs should move
RETENTION = "7d"


def binary() -> str | None:
    return shutil.which("prometheus")


def config(
    targets: Mapping[str, int], rules: Path | None = RULES, key_file: Path | None = None
) -> str:
    """prometheus.yml: one job per service (its metrics port on loopback), presenting the
    reader key in `key_file` (/metrics needs one), and the rules."""
    jobs = []
    for name, port in targets.items():
        job: dict = {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        if key_file is not None:
            job["authorization"] = {"type": "Bearer", "credentials_file": str(key_file)}
        jobs.append(job)
    document: dict = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "15s"},
        "scrape_configs": jobs,
    }
    if rules is not None and rules.exists():
        document["rule_files"] = [str(rules)]
    return yaml.safe_dump(document, sort_keys=False)


def command(run_dir: Path, port: int, targets: Mapping[str, int], reader_key: str) -> list[str]:
    """Write the config (and the reader key, mode 0600) under `run_dir/prometheus/` and return
    the command line serving it."""
    home = run_dir.resolve() / "prometheus"
    home.mkdir(parents=True, exist_ok=True)
    key_file = home / "reader.key"
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(reader_key)
    config_file = home / "prometheus.yml"
    config_file.write_text(config(targets, key_file=key_file))
    return [
        binary() or "prometheus",
        f"--config.file={config_file}",
        f"--storage.tsdb.path={home / 'data'}",
        f"--storage.tsdb.retention.time={RETENTION}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


def ready(port: int, timeout: float) -> bool:
    """Whether Prometheus answers /-/ready within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False
