"""The ppo stage's work: joined prompts in, PPO iterations, policy checkpoints out.

Each unit of work takes a batch of prompts that received feedback, runs a PPO iteration
(rollouts from the trainer's policy, scored by the reward service; `rlhf.training.online`) and
every `publish_every` updates writes a checkpoint: trainer state vN (including the intake's join
state and the offsets it covers) and then policy vN, and hands it to the stage skeleton, which
announces the policy and only then commits those offsets. A restarted trainer resumes from the
state and seeks to its offsets, so every feedback event is used exactly once across crashes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter, Gauge

from rlhf.canary import RolledBack
from rlhf.checkpoints import POLICY, PPO_STATE, Manifest
from rlhf.clients import RewardUnavailable
from rlhf.joining import Joined
from rlhf.models import policy_from_checkpoint
from rlhf.scoring import reward_prompt
from rlhf.training import Interrupted
from rlhf.training.distributed import ShardFailed
from rlhf.training.online import PPOLearner, Scorer

from ..servicer import COLLECTING, COMMAND_TIMEOUT, TRAINING, WAITING
from ..stage import Stage, StageParts
from .intake import Intake
from .lockstep import Lockstep
from .state import write_checkpoint

log = logging.getLogger(__name__)

STATS = Gauge("rlhf_trainer_stat", "last PPO statistics, named like TRL's", ["name"])
UPDATES = Counter("rlhf_trainer_updates_total", "PPO updates done")
PUBLISHED_VERSION = Gauge("rlhf_trainer_published_version", "last policy version published")
FAILED_BATCHES = Counter("rlhf_trainer_failed_batches_total", "PPO iterations that raised")
STALENESS = Gauge(
    "rlhf_trainer_data_staleness_seconds", "age of the oldest prompt in the last PPO batch"
)
KL_WARNINGS = Counter(
    "rlhf_trainer_kl_warnings_total", "PPO updates whose KL was negative or exploded", ["kind"]
)
ROLLBACKS = Counter(
    "rlhf_trainer_rollbacks_total", "rollbacks of the policy (an operator's or a followed one)"
)
FOLLOWED = Counter(
    "rlhf_trainer_followed_rollbacks_total",
    "canary rollbacks the ppo stage followed back to the incumbent (RLHF_PPO_FOLLOW_ROLLBACKS)",
)
ALGORITHM = Gauge(
    "rlhf_trainer_algorithm",
    "1 for the policy optimisation algorithm the ppo stage runs (RLHF_PPO_ALGORITHM: ppo, grpo "
    "or rloo)",
    ["algorithm"],
)

# How often a ppo stage waiting for a trained reward model asks the reward service again.
REWARD_CHECK_SECONDS = 5.0
# A sampled k1 KL estimate of a few hundredths below 0 is noise; below this it is a bug
# (sampling and scoring temperatures or masks differ).
NEGATIVE_KL_TOLERANCE = -0.05


@dataclass(frozen=True)
class LoopSettings:
    batch_size: int = 8
    publish_every: int = 1
    kl_alarm: float = 50.0  # nats per sequence: above it, warn that KL exploded
    min_reward_version: int = 0  # no PPO before the reward service serves this version
    metrics_log: Path | None = None
    protect: frozenset[int] = frozenset()  # policy versions never pruned (the reference)


class TrainingLoop(Stage):
    """Runs PPO iterations as joined prompts arrive and publishes policy checkpoints."""

    name = "ppo"
    product_kind, state_kind = POLICY, PPO_STATE

    def __init__(
        self,
        parts: StageParts,
        learner: PPOLearner | Lockstep,
        score: Scorer,
        settings: LoopSettings,
        start_version: int,
        lora_base_version: int = 0,
        reward_version: Callable[[], int] | None = None,
        base_policy: Callable[[], torch.nn.Module] | None = None,
    ) -> None:
        """`reward_version`: asks the reward service which reward model it serves (needed
        with a minimum version in `settings`); `base_policy` loads v0's weights (the base
        model, which is not in the store) for a rollback to v0."""
        self.algorithm = learner.config.algorithm
        super().__init__(
            parts, policy_version=start_version, step=learner.updates, algorithm=self.algorithm
        )
        ALGORITHM.labels(self.algorithm).set(1)
        self.learner, self._score, self.settings = learner, score, settings
        self._reward_version = reward_version
        self._base_policy = base_policy
        self._started_at = time.time()  # rollbacks decided before this are history
        self._served_reward = 0  # the reward model version last seen served
        self._reward_checked = -math.inf
        self.intake: Intake = parts.intake  # type: ignore[assignment]
        self._lora_base = lora_base_version
        self._last_stats: dict[str, float] = {}

    def live_status(self) -> dict[str, Any]:
        return {
            "pending_prompts": len(self.intake),
            "feedback_used": self.intake.used.count,
            "dropped_prompts": self.intake.dropped_prompts,
        }

    # Operator commands -----------------------------------------------------------------------

    def checkpoint_now(self, timeout: float = COMMAND_TIMEOUT) -> Manifest:
        """Write and announce a checkpoint of the current policy, after the running update."""
        return self.run_command(lambda: self._publish(self._last_stats), timeout)

    def rollback(self, version: int, pause: bool, timeout: float = COMMAND_TIMEOUT) -> Manifest:
        """Serve policy `version`'s weights again, as a new version, and train on from them.

        Raises CheckpointError if the version is not in the store or fails verification.
        """
        return self.run_command(lambda: self._rollback(version, pause), timeout)

    def follow_rollback(self, ended: RolledBack) -> None:
        """The release stage rolled `ended.candidate` back: train on from the incumbent that
        kept serving (RLHF_PPO_FOLLOW_ROLLBACKS). Queued between updates, not waited for; it
        does nothing for a rollback decided before this process started (a replay of the
        release topic: history) or when this stage's policy is not newer than the candidate
        (nothing of the rolled-back line to leave)."""
        if ended.decided_at < self._started_at:
            return
        self.queue_command(lambda: self._follow(ended))

    def _follow(self, ended: RolledBack) -> Manifest | None:
        head = self._status.policy_version
        if head < ended.candidate:
            log.info(
                "release rolled v%d back; this stage's v%d is not of its line, nothing to follow",
                ended.candidate,
                head,
            )
            return None
        log.warning(
            "the release stage rolled v%d back to v%d: training on from v%d (was at v%d)",
            ended.candidate,
            ended.incumbent,
            ended.incumbent,
            head,
        )
        FOLLOWED.inc()
        return self._rollback(ended.incumbent, pause=False)

    def _rollback(self, version: int, pause: bool) -> Manifest:
        if pause:
            self.pause()
        if version == 0 and self._base_policy is not None:  # v0 is the base model, not stored
            weights = self._base_policy()
        else:
            weights = policy_from_checkpoint(self._store.load(POLICY, version))
        self.learner.rebase(weights)
        if self.learner.lora.enabled:  # a fresh adapter starts over these weights
            self._lora_base = (self._store.latest_version(POLICY) or 0) + 1
        manifest = self._publish(self._last_stats, rolled_back_from=version)
        ROLLBACKS.inc()
        log.warning("rolled back: policy v%d serves v%d's weights", manifest.version, version)
        return manifest

    # The work ---------------------------------------------------------------------------------

    def work(self) -> bool:
        if not self._reward_ready():
            return False
        queued, wanted = len(self.intake), self.settings.batch_size
        if queued < wanted:
            self.set_phase(COLLECTING, f"{queued} of {wanted} prompts with feedback for a batch")
            return False
        batch, staleness = self.intake.take(wanted)
        if not batch:  # all of them were too old
            return True
        self.set_phase(TRAINING, self._training_detail(wanted))
        try:
            self.step(batch, staleness)
        except Exception:  # one bad batch must not stop training for good
            FAILED_BATCHES.inc()
            log.exception("PPO iteration failed; dropping its %d prompts", len(batch))
        return True

    def _training_detail(self, prompts: int) -> str:
        answers = self.learner.config.answers_per_prompt
        each = f", {answers} answers each" if answers > 1 else ""
        return f"{self.algorithm} on batches of {prompts} prompts with feedback{each}"

    def _reward_ready(self) -> bool:
        """Whether the reward service serves a reward model PPO may train against (asked every
        few seconds while it does not). Before one has earned it, scores are an untrained
        head's noise, and every update would optimise that."""
        wanted = self.settings.min_reward_version
        if wanted <= 0 or self._served_reward >= wanted:
            return True
        now = time.monotonic()
        if now - self._reward_checked < REWARD_CHECK_SECONDS:
            return False
        self._reward_checked = now
        assert self._reward_version is not None, "a minimum reward version needs a way to ask"
        try:
            self._served_reward = self._reward_version()
        except RewardUnavailable as exc:
            self.set_phase(WAITING, f"the reward service does not answer ({exc})")
            return False
        if self._served_reward >= wanted:
            log.info("reward model v%d is served: PPO starts", self._served_reward)
            return True
        served = (
            "an untrained reward model (v0)"
            if self._served_reward == 0
            else f"reward model v{self._served_reward}"
        )
        self.set_phase(
            WAITING,
            f"no PPO until the reward service serves reward model v{wanted} or newer "
            f"(RLHF_PPO_MIN_REWARD_VERSION); it serves {served}",
        )
        return False

    def step(self, batch: list[Joined], staleness: float = 0.0) -> dict[str, float] | None:
        """One PPO iteration on a batch of joined prompts; publishes when it is time."""
        prompts = [list(j.generation.prompt_token_ids) for j in batch]
        # The reward model is asked about the user's words, as it was trained (not the template).
        texts = [reward_prompt(j.generation) for j in batch]
        try:
            stats = self.learner.iterate(
                prompts, self._score, prompt_texts=texts, stopping=self.stopping
            )
        except Interrupted as exc:
            # Nothing of it is published (the learner refuses a part-update) and its prompts'
            # offsets stay uncommitted: the restarted stage reads them again.
            self.intake.put_back(batch)
            log.info("ppo stage: iteration given up on stop (%s)", exc)
            return None
        except (RewardUnavailable, ShardFailed) as exc:
            log.warning("rollouts or rewards unavailable (%s); retrying the batch shortly", exc)
            self.intake.put_back(batch)
            self.wait(2.0)
            return None
        self.intake.mark_used(batch)
        stats["data/staleness_seconds"] = staleness
        self._record(stats)
        if self.learner.updates % self.settings.publish_every == 0:
            self._publish(stats)
        return stats

    def _record(self, stats: dict[str, float]) -> None:
        """Export an update's statistics: gauges, status, log line, JSONL, KL warnings."""
        UPDATES.inc()
        for name, value in stats.items():
            STATS.labels(name).set(value)
        STALENESS.set(stats["data/staleness_seconds"])
        self._last_stats = stats
        reward_version = int(stats.get("reward/model_version", 0))
        self._served_reward = max(self._served_reward, reward_version)
        self.update_status(
            reward_version=reward_version,
            step=self.learner.updates,
            kl=stats["objective/kl"],
            mean_reward=stats["objective/scores"],
            metrics=dict(stats),
            data_staleness_seconds=stats["data/staleness_seconds"],
        )
        log.info(
            "%s update %d: reward %.3f kl %.3f (coefficient %.3f, reward model v%d)",
            self.algorithm,
            self.learner.updates,
            stats["objective/scores"],
            stats["objective/kl"],
            stats["objective/kl_coef"],
            reward_version,
        )
        self._warn_about_kl(stats["objective/kl"])
        if self.settings.metrics_log is not None:
            self._append_jsonl(stats)

    def _warn_about_kl(self, kl: float) -> None:
        if kl < NEGATIVE_KL_TOLERANCE:
            KL_WARNINGS.labels("negative").inc()
            log.warning(
                "KL to the reference is negative (%.3f nats) at update %d: the logprobs used "
                "for the update do not match the sampling distribution (temperature, top-k/top-p "
                "or masking differ between rollout and scoring)",
                kl,
                self.learner.updates,
            )
        elif kl > self.settings.kl_alarm or not math.isfinite(kl):
            KL_WARNINGS.labels("exploded").inc()
            log.warning(
                "KL to the reference exploded (%.1f nats > %.1f) at update %d: the policy is "
                "drifting far from the reference; lower the learning rate, raise the KL "
                "coefficient or roll back (rlhf rollback)",
                kl,
                self.settings.kl_alarm,
                self.learner.updates,
            )

    def _append_jsonl(self, stats: dict[str, float]) -> None:
        path = self.settings.metrics_log
        assert path is not None
        line = {
            "time": time.time(),
            "step": self.learner.updates,
            "algorithm": self.algorithm,
            "policy_version": self._status.policy_version,
            "feedback_used": self.intake.used.count,
            **stats,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
        except OSError as exc:  # a full or read-only disk must not stop training
            log.warning("could not append to the metrics log %s: %s", path, exc)

    # Checkpoints ------------------------------------------------------------------------------

    def _publish(self, stats: dict[str, float], rolled_back_from: int | None = None) -> Manifest:
        """Write trainer state and policy; the skeleton announces, prunes and commits."""
        snapshot = self.intake.snapshot()
        metadata: dict[str, Any] = {
            "stats": stats,
            "algorithm": self.algorithm,
            "updates": self.learner.updates,
            "data_parallel_ranks": self.learner.world.size,
        }
        if rolled_back_from is not None:  # 0 too: the base model's weights
            metadata["rolled_back_from"] = rolled_back_from
        manifest = write_checkpoint(
            self._store,
            self.learner,
            snapshot,
            parent_version=self._status.policy_version,
            lora_base_version=self._lora_base,
            metadata=metadata,
        )
        self.checkpoint_written(manifest, snapshot.offsets)
        return manifest

    def announced(self, manifest: Manifest) -> None:
        self.update_status(policy_version=manifest.version)
        PUBLISHED_VERSION.set(manifest.version)

    def prune(self) -> None:
        # With LoRA, the adapter's base weights must outlive pruning: resuming needs them.
        protect = self.settings.protect
        if self.learner.lora.enabled:
            protect = protect | {self._lora_base}
        self._store.prune(POLICY, keep=self.keep.checkpoints, protect=protect)
        self._store.prune(PPO_STATE, keep=self.keep.states)
