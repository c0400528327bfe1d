"""TrainerService: the trainer's control plane."""

from __future__ import annotations

from typing import Protocol

import grpc

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

from .loop import Status


class HasStatus(Protocol):
    """A stage's training loop, as the control plane sees it."""

    @property
    def status(self) -> Status: ...


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, loop: HasStatus) -> None:
        self._loop = loop

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
        )
