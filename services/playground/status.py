"""The panel's numbers: a `rlhf.watch` snapshot, refreshed in the background and served as JSON
(however many pages poll, the services are asked once per interval)."""

from __future__ import annotations

import threading
import time
from typing import Any

from rlhf.auth import ClientSecurity
from rlhf.v1 import trainer_pb2
from rlhf.watch import Snapshot, Watcher

from .config import PlaygroundConfig

VERSIONS_SHOWN = 12  # newest policy versions in the trend


def trainer_json(status: trainer_pb2.TrainerStatus) -> dict[str, Any]:
    return {
        "stage": status.stage,
        "step": status.step,
        "policyVersion": status.policy_version,
        "rewardVersion": status.reward_version,
        "paused": status.paused,
        "phase": status.phase,
        "phaseDetail": status.phase_detail,
        "kl": status.kl,
        "meanReward": status.mean_reward,
        "pendingPrompts": status.pending_prompts,
    }


def status_json(shot: Snapshot) -> dict[str, Any]:
    policy = shot.policy
    return {
        "policy": None
        if policy is None
        else {"version": policy.version, "model": policy.model, "backend": policy.backend},
        "trainer": None if shot.ppo is None else trainer_json(shot.ppo),
        "rewardModel": None if shot.reward is None else trainer_json(shot.reward),
        "versions": [
            {"version": row.version, "thumbs": row.thumbs, "up": row.up, "upRate": row.up_rate}
            for row in shot.versions[-VERSIONS_SHOWN:]
            if row.thumbs
        ],
        "feedback": {"total": shot.feedback_total, "perMinute": shot.feedback_per_minute},
        "missing": shot.missing,
        "takenAt": time.time(),
    }


class StatusBoard:
    """The latest status, refreshed every `status_every_seconds` by one background thread."""

    def __init__(self, config: PlaygroundConfig) -> None:
        addresses = {
            "generation": config.generation_address,
            "trainer": config.trainer_address,
            "reward-trainer": config.reward_trainer_address,
        }
        self._watcher = Watcher(
            {name: address for name, address in addresses.items() if address},
            {"feedback": config.feedback_metrics_url},
            ClientSecurity.of(config),  # a reader key (RLHF_CLIENT_KEY)
        )
        self._every = config.status_every_seconds
        self._latest = status_json(Snapshot(missing=["not asked yet"]))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="playground-status", daemon=True)

    def latest(self) -> dict[str, Any]:
        with self._lock:
            return self._latest

    def _run(self) -> None:
        while True:
            latest = status_json(self._watcher.snapshot())
            with self._lock:
                self._latest = latest
            if self._stop.wait(self._every):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._watcher.close()
