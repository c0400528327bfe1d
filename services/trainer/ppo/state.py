"""What the PPO trainer saves beside each policy checkpoint, and how it comes back.

A policy checkpoint vN holds the served weights. The trainer state vN (kind `ppo-state`, same
version) holds the rest of a resumable trainer: the learner's state (value head, optimizer,
KL controller, RNG, LoRA adapter), the intake's join state (generations waiting for feedback,
feedback waiting for its generation, feedback ids seen, joined prompts not trained on yet), the
consumer offsets all of that covers, and the ledger of feedback used. The state is written
before the policy, so a policy version that exists always has its state, and state without a
policy (a crash in between) is discarded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.checkpoints import POLICY, PPO_STATE, CheckpointError, CheckpointStore, Manifest
from rlhf.models import policy_checkpoint_files, policy_from_checkpoint
from rlhf.training.online import LEARNER_FILE, PPOLearner, saved_algorithm
from rlhf.training.state import IntakeState, intake_files, intake_from_files

from .intake import QUEUED_GENERATIONS, Intake

log = logging.getLogger(__name__)

LOOP_JSON = "loop.json"


def write_checkpoint(
    store: CheckpointStore,
    learner: PPOLearner,
    snapshot: IntakeState,
    parent_version: int,
    lora_base_version: int,
    metadata: dict[str, Any],
) -> Manifest:
    """Write trainer state vN, then policy vN (the served weights); returns the policy's
    manifest. N is the next policy version."""
    version = (store.latest_version(POLICY) or 0) + 1
    if store.discard(PPO_STATE, version):
        log.warning("discarded trainer state v%d left without its policy", version)
    state_tensors, state_json = learner.state_files()
    intake_tensors, intake_json = intake_files(snapshot)
    store.write(
        PPO_STATE,
        {**state_tensors, **intake_tensors},
        {**state_json, **intake_json, LOOP_JSON: {"lora_base": lora_base_version}},
        parent_version=parent_version,
        version=version,
    )
    tensors, json_files = policy_checkpoint_files(learner.export_policy())
    used = snapshot.data["used"]
    ledger = {"feedback_used": used["count"], "feedback_digest": used["digest"]}
    return store.write(
        POLICY,
        tensors,
        json_files,
        parent_version=parent_version,
        version=version,
        metadata={**metadata, **ledger},
    )


@dataclass
class Resumed:
    """Where a starting trainer picks up."""

    learner: PPOLearner
    policy_version: int  # newest published policy (0: the base model)
    lora_base_version: int  # the weights under the LoRA adapter (0: the base model)
    intake: IntakeState | None = None  # None: start from the group's committed offsets


def resume(
    store: CheckpointStore,
    load_base: Callable[[], torch.nn.Module],
    make_learner: Callable[[torch.nn.Module], PPOLearner],
    lora_rank: int,
    algorithm: str = "ppo",
) -> Resumed:
    """A learner continuing from the newest policy and, when it has one, its trainer state.

    Without usable state (a first start, or state saved with another LoRA rank or by another
    algorithm) training continues from the policy weights with a fresh optimizer; the intake's
    state is still restored when present, so no feedback is lost or counted twice either way.

    Switching RLHF_PPO_ALGORITHM is handled, not refused and not mixed: ppo's state has a value
    head and optimizer moments for it, grpo's and rloo's have neither, and moments learnt
    under one estimator's advantages do not belong to another's. So a switch keeps the
    policy (the served weights, and what the users' feedback has taught it so far) and the
    intake, and starts the learner afresh (optimizer, KL coefficient, value head for ppo), as
    a change of LoRA rank does. Refusing would leave an operator who changed the setting
    with a stage that cannot start until the store is edited by hand.
    """
    version = store.latest_version(POLICY) or 0
    if version == 0:
        return Resumed(make_learner(load_base()), 0, lora_base_version=0)
    policy = _load_policy(store, version)
    try:
        state = store.load(PPO_STATE, version)
    except CheckpointError as exc:
        log.warning("policy v%d has no trainer state (%s); fresh optimizer", version, exc)
        return Resumed(make_learner(policy), version, lora_base_version=version)
    snapshot = intake_from_files(state.tensors, state.json_files, Intake.messages)
    saved_rank = int(state.json_files[LEARNER_FILE]["lora_rank"])
    saved_by = saved_algorithm(state.json_files[LEARNER_FILE])
    lora_base = int(state.json_files[LOOP_JSON]["lora_base"])
    if saved_rank != lora_rank or saved_by != algorithm:
        log.warning(
            "trainer state v%d was saved by %s with LoRA rank %d, this trainer runs %s with "
            "rank %d: a fresh learner (optimizer, KL coefficient, value head) from the policy "
            "weights; the intake is restored",
            version,
            saved_by,
            saved_rank,
            algorithm,
            lora_rank,
        )
        return Resumed(make_learner(policy), version, version, snapshot)
    if lora_rank > 0:
        # The adapter applies to the weights it was trained on, not to the merged policy.
        policy = load_base() if lora_base == 0 else _load_policy(store, lora_base)
    learner = make_learner(policy)
    learner.load_state(state.tensors, state.json_files)
    log.info(
        "resumed from policy v%d at update %d: %d queued prompts, %d feedback events used",
        version,
        learner.updates,
        len(snapshot.messages[QUEUED_GENERATIONS]),
        snapshot.data["used"]["count"],
    )
    return Resumed(learner, version, lora_base, snapshot)


def _load_policy(store: CheckpointStore, version: int) -> torch.nn.Module:
    return policy_from_checkpoint(store.load(POLICY, version))
