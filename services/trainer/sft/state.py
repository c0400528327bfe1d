"""What the sft stage saves after every round, and how it comes back.

An sft state (kind `sft-state`, its own sequence of versions) holds the intake: the join
(generations waiting for a correction, corrections waiting for their generation, feedback ids
seen), the demonstrations not trained on yet, counters, and the consumer offsets all of that
covers; the stage commits those offsets once the state is in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.checkpoints import SFT_STATE, CheckpointStore, Manifest, VerifiedCheckpoint
from rlhf.joining import JoinState
from rlhf.training.sft import Demonstration
from rlhf.training.state import offsets_from_json, offsets_json, pack_join, unpack_join

from ..stage import newest_state

JOIN_TENSORS = "join.safetensors"
INTAKE_JSON = "intake.json"


@dataclass
class SFTIntakeState:
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    join: JoinState = field(default_factory=lambda: JoinState([], [], []))
    demos: list[Demonstration] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)


def write_state(
    store: CheckpointStore, state: SFTIntakeState, metadata: dict[str, Any]
) -> Manifest:
    """Write the next sft state version."""
    demos = [[list(d.prompt_ids), list(d.response_ids)] for d in state.demos]
    return store.write(
        SFT_STATE,
        {JOIN_TENSORS: pack_join(state.join)},
        {
            INTAKE_JSON: {
                "offsets": offsets_json(state.offsets),
                "counters": state.counters,
                "demos": demos,
            }
        },
        metadata=metadata,
    )


def restore_state(store: CheckpointStore) -> SFTIntakeState | None:
    """The newest usable sft state (`stage.newest_state`), or None on a first start."""
    return newest_state(store, SFT_STATE, _decode)


def _decode(checkpoint: VerifiedCheckpoint) -> SFTIntakeState:
    intake = checkpoint.json_files[INTAKE_JSON]
    return SFTIntakeState(
        offsets=offsets_from_json(intake["offsets"]),
        join=unpack_join(checkpoint.tensors[JOIN_TENSORS]),
        demos=[Demonstration(tuple(p), tuple(r)) for p, r in intake["demos"]],
        counters=dict(intake["counters"]),
    )
