"""What the reward stage saves after every round, and how it comes back.

A reward state (kind `reward-state`, its own sequence of versions) holds the intake: the join
(generations and feedback waiting for each other, feedback ids seen), every example collected
(both splits and the fresh ones), the reference-answer sample, counters, and the consumer
offsets all of that covers. The stage commits those offsets only once the state is in the store,
so a restarted stage restores it, seeks to the offsets and misses or repeats nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.checkpoints import REWARD_STATE, CheckpointStore, Manifest, VerifiedCheckpoint
from rlhf.joining import JoinState
from rlhf.training.state import offsets_from_json, offsets_json, pack_join, unpack_join

from ..stage import newest_state

JOIN_TENSORS = "join.safetensors"
INTAKE_JSON = "intake.json"
DATASET_JSON = "dataset.json"
REFERENCE_JSON = "reference.json"


@dataclass
class RewardIntakeState:
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    join: JoinState = field(default_factory=lambda: JoinState([], [], []))
    dataset: dict[str, list[list[Any]]] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


def write_state(
    store: CheckpointStore, state: RewardIntakeState, metadata: dict[str, Any]
) -> Manifest:
    """Write the next reward state version."""
    return store.write(
        REWARD_STATE,
        {JOIN_TENSORS: pack_join(state.join)},
        {
            INTAKE_JSON: {"offsets": offsets_json(state.offsets), "counters": state.counters},
            DATASET_JSON: state.dataset,
            REFERENCE_JSON: state.reference,
        },
        metadata=metadata,
    )


def restore_state(store: CheckpointStore) -> RewardIntakeState | None:
    """The newest usable reward state (`stage.newest_state`), or None on a first start."""
    return newest_state(store, REWARD_STATE, _decode)


def _decode(checkpoint: VerifiedCheckpoint) -> RewardIntakeState:
    intake = checkpoint.json_files[INTAKE_JSON]
    return RewardIntakeState(
        offsets=offsets_from_json(intake["offsets"]),
        join=unpack_join(checkpoint.tensors[JOIN_TENSORS]),
        dataset=checkpoint.json_files[DATASET_JSON],
        reference=checkpoint.json_files[REFERENCE_JSON],
        counters=dict(intake["counters"]),
    )
