"""Training state as safetensors tensors plus JSON: optimizer moments, RNG states, a stage's
intake (join state, queued protobuf events, id lists, offsets), so a trainer checkpoint never
needs pickle.

Pure conversions; the checkpoint store does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from google.protobuf.message import Message

from rlhf.joining import JoinState
from rlhf.v1 import events_pb2

M = TypeVar("M", bound=Message)


def pack_blobs(prefix: str, blobs: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """Byte strings as one uint8 tensor and their lengths (safetensors has no string type)."""
    joined = b"".join(blobs)
    data = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.zeros(0)
    return {
        f"{prefix}.data": data.to(torch.uint8),
        f"{prefix}.lengths": torch.tensor([len(b) for b in blobs], dtype=torch.int64),
    }


def unpack_blobs(prefix: str, tensors: dict[str, torch.Tensor]) -> list[bytes]:
    data = tensors[f"{prefix}.data"].numpy().tobytes()
    blobs, start = [], 0
    for length in tensors[f"{prefix}.lengths"].tolist():
        blobs.append(data[start : start + length])
        start += length
    if start != len(data):
        raise ValueError(f"{prefix}: lengths cover {start} bytes of {len(data)}")
    return blobs


def pack_messages(prefix: str, messages: Sequence[Message]) -> dict[str, torch.Tensor]:
    return pack_blobs(prefix, [m.SerializeToString() for m in messages])


def unpack_messages(
    prefix: str, tensors: dict[str, torch.Tensor], message_type: type[M]
) -> list[M]:
    return [message_type.FromString(blob) for blob in unpack_blobs(prefix, tensors)]


def pack_strings(prefix: str, strings: Sequence[str]) -> dict[str, torch.Tensor]:
    return pack_blobs(prefix, [s.encode("utf-8") for s in strings])


def unpack_strings(prefix: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    return [blob.decode("utf-8") for blob in unpack_blobs(prefix, tensors)]


def optimizer_state(
    optimizer: torch.optim.Optimizer,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) for an optimizer's state dict: per-parameter tensors go to safetensors,
    hyperparameters and plain numbers to JSON. `gather` makes each tensor whole (a sharded
    optimizer's moments are slices); it is called in the same order on every rank."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = gather(value.detach()).to("cpu").clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of `optimizer_state`; the optimizer must cover the same parameters."""
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def pack_join(join: JoinState, prefix: str = "") -> dict[str, torch.Tensor]:
    """A join's state (`rlhf.joining.FeedbackJoin.snapshot`) as tensors, named
    `<prefix>generations`, `<prefix>orphans` and `<prefix>seen`."""
    return {
        **pack_messages(f"{prefix}generations", join.generations),
        **pack_messages(f"{prefix}orphans", join.orphans),
        **pack_strings(f"{prefix}seen", join.seen_feedback_ids),
    }


def unpack_join(tensors: dict[str, torch.Tensor], prefix: str = "") -> JoinState:
    return JoinState(
        generations=unpack_messages(f"{prefix}generations", tensors, events_pb2.GenerationEvent),
        orphans=unpack_messages(f"{prefix}orphans", tensors, events_pb2.FeedbackEvent),
        seen_feedback_ids=unpack_strings(f"{prefix}seen", tensors),
    )


def offsets_json(offsets: dict[tuple[str, int], int]) -> list[list[Any]]:
    """Consumer offsets ((topic, partition) -> next offset) as JSON."""
    return [[topic, partition, offset] for (topic, partition), offset in offsets.items()]


def offsets_from_json(rows: list[list[Any]]) -> dict[tuple[str, int], int]:
    return {(str(topic), int(partition)): int(offset) for topic, partition, offset in rows}


INTAKE_TENSORS = "intake.safetensors"
INTAKE_JSON = "intake.json"


@dataclass
class IntakeState:
    """A trainer stage's intake at one instant: the offsets it has consumed up to and what it
    holds because of them: the join (generations and feedback waiting for each other, feedback
    ids seen), counters, and the stage's own content: JSON (`data`: examples, demonstrations,
    a ledger) and queued events (`messages`: lists of protobuf messages by name)."""

    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    join: JoinState = field(default_factory=lambda: JoinState([], [], []))
    counters: dict[str, int] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    messages: dict[str, list[Message]] = field(default_factory=dict)


def intake_files(state: IntakeState) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensor files, JSON files) holding `state`, for the checkpoint store."""
    tensors = pack_join(state.join)
    for name, messages in state.messages.items():
        tensors.update(pack_messages(name, messages))
    meta = {"offsets": offsets_json(state.offsets), "counters": state.counters, **state.data}
    return {INTAKE_TENSORS: tensors}, {INTAKE_JSON: meta}


def intake_from_files(
    tensors: dict[str, dict[str, torch.Tensor]],
    json_files: dict[str, Any],
    message_types: dict[str, type[Message]] | None = None,
) -> IntakeState:
    """Inverse of `intake_files`; `message_types` names the queued message lists to read."""
    packed, meta = tensors[INTAKE_TENSORS], dict(json_files[INTAKE_JSON])
    offsets, counters = meta.pop("offsets"), meta.pop("counters")
    return IntakeState(
        offsets=offsets_from_json(offsets),
        join=unpack_join(packed),
        counters={str(k): int(v) for k, v in counters.items()},
        data=meta,
        messages={
            name: unpack_messages(name, packed, kind)
            for name, kind in (message_types or {}).items()
        },
    )
