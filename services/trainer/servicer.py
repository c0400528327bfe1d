"""TrainerService: the trainer's control plane, shared by every stage, and the vocabulary it
speaks (a stage's `Status`, its phases, `Unsupported` commands)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.checkpoints import CheckpointError, CheckpointStore, Manifest
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

COMMAND_TIMEOUT = 600.0
T = TypeVar("T")
# Phases of a stage, as `GetStatus` reports them.
COLLECTING, WAITING, TRAINING, PAUSED_PHASE = "collecting", "waiting", "training", "paused"


class Unsupported(Exception):
    """A control-plane command the stage does not offer (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class Status:
    stage: str = "ppo"
    step: int = 0
    policy_version: int = 0
    kl: float = 0.0
    mean_reward: float = 0.0
    pending_prompts: int = 0
    feedback_consumed: int = 0
    reward_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    paused: bool = False
    feedback_used: int = 0
    dropped_prompts: int = 0  # ppo stage: joined prompts dropped untrained (too old, overflow)
    data_staleness_seconds: float = 0.0
    consumer_lag: int = 0
    phase: str = COLLECTING
    phase_detail: str = ""
    algorithm: str = ""  # ppo stage: ppo, grpo or rloo
    release: trainer_pb2.ReleaseStatus | None = None  # release stage: the canary


def manifest_fields(manifest: Manifest) -> dict[str, Any]:
    """The fields the checkpoint messages (event, control-plane info) take from a manifest."""
    created = Timestamp()
    created.FromNanoseconds(int(manifest.created_at * 1e9))
    return {
        "version": manifest.version,
        "parent_version": manifest.parent_version,
        "path": manifest.path,
        "created_at": created,
    }


class StageLoop(Protocol):
    """A stage's training loop, as the control plane sees it."""

    @property
    def status(self) -> Status: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def checkpoint_now(self, timeout: float = ...) -> Manifest: ...

    def rollback(self, version: int, pause: bool, timeout: float = ...) -> Manifest: ...

    def decide(self, verdict: int, timeout: float = ...) -> None: ...


def checkpoint_info(manifest: Manifest, manifest_sha256: str) -> trainer_pb2.CheckpointInfo:
    stats = manifest.metadata.get("stats", {})
    return trainer_pb2.CheckpointInfo(
        kind=manifest.kind,
        manifest_sha256=manifest_sha256,
        metrics={k: float(v) for k, v in stats.items() if isinstance(v, int | float)},
        rolled_back_from=int(manifest.metadata.get("rolled_back_from", 0)),
        **manifest_fields(manifest),
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, loop: StageLoop, store: CheckpointStore, kind: str) -> None:
        self._loop = loop
        self._store = store
        self._kind = kind

    def GetStatus(
        self, request: trainer_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        status = self._loop.status
        return trainer_pb2.TrainerStatus(
            stage=status.stage,
            step=status.step,
            policy_version=status.policy_version,
            kl=status.kl,
            mean_reward=status.mean_reward,
            pending_prompts=status.pending_prompts,
            feedback_consumed=status.feedback_consumed,
            reward_version=status.reward_version,
            metrics=status.metrics,
            paused=status.paused,
            feedback_used=status.feedback_used,
            dropped_prompts=status.dropped_prompts,
            data_staleness_seconds=status.data_staleness_seconds,
            consumer_lag=status.consumer_lag,
            phase=status.phase,
            phase_detail=status.phase_detail,
            algorithm=status.algorithm,
            release=status.release,
        )

    def Pause(
        self, request: trainer_pb2.PauseRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        self._loop.pause()
        return self.GetStatus(trainer_pb2.GetStatusRequest(), context)

    def Resume(
        self, request: trainer_pb2.ResumeRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        self._loop.resume()
        return self.GetStatus(trainer_pb2.GetStatusRequest(), context)

    def Checkpoint(
        self, request: trainer_pb2.CheckpointRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.CheckpointInfo:
        return self._info(
            self._command(context, lambda timeout: self._loop.checkpoint_now(timeout))
        )

    def Rollback(
        self, request: trainer_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.CheckpointInfo:
        versions = self._store.versions(self._kind)
        if request.version not in versions:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no {self._kind} version {request.version} in the store (have {versions})",
            )
        return self._info(
            self._command(
                context,
                lambda timeout: self._loop.rollback(request.version, request.pause, timeout),
            )
        )

    def Decide(
        self, request: trainer_pb2.DecideRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        if request.verdict not in (
            trainer_pb2.RELEASE_VERDICT_PROMOTE,
            trainer_pb2.RELEASE_VERDICT_ROLLBACK,
        ):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "verdict must be promote or rollback")
        self._command(context, lambda timeout: self._loop.decide(request.verdict, timeout))
        return self.GetStatus(trainer_pb2.GetStatusRequest(), context)

    def ListCheckpoints(
        self, request: trainer_pb2.ListCheckpointsRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ListCheckpointsReply:
        versions = sorted(self._store.versions(self._kind), reverse=True)
        if request.limit:
            versions = versions[: request.limit]
        infos = []
        for version in versions:
            try:
                infos.append(checkpoint_info(*self._store.read_manifest(self._kind, version)))
            except CheckpointError:  # pruned meanwhile, or malformed: not listable
                continue
        return trainer_pb2.ListCheckpointsReply(checkpoints=infos)

    def _command(self, context: grpc.ServicerContext, run: Callable[[float], T]) -> T:
        """Run a command on the training thread within the call's deadline; map failures."""
        remaining = context.time_remaining()
        # No deadline reads as a huge remaining time (or None): wait COMMAND_TIMEOUT at most.
        timeout = min(COMMAND_TIMEOUT, max(0.0, (remaining or COMMAND_TIMEOUT) - 0.5))
        try:
            return run(timeout)
        except Unsupported as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except CheckpointError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"checkpoint refused: {exc}")
        except concurrent.futures.TimeoutError:
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the running update did not finish in time"
            )
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("unreachable: abort raises")

    def _info(self, manifest: Manifest) -> trainer_pb2.CheckpointInfo:
        return checkpoint_info(*self._store.read_manifest(self._kind, manifest.version))
