"""TrainerService: the trainer's control plane."""

from __future__ import annotations

from typing import Protocol

import grpc

from rlhf.bus import Publisher
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

from .config import TrainerConfig
from .loop import ConsumerThread, Status


class HasStatus(Protocol):
    """A stage's training loop, as the control plane sees it."""

    @property
    def status(self) -> Status: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


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


class StageService:
    """What every trainer stage shares: the control plane, an intake thread feeding a training
    loop thread, and the drain order on SIGTERM (loop, intake, clients, producer)."""

    name = "trainer"
    config: TrainerConfig
    intake: ConsumerThread
    loop: HasStatus
    publisher: Publisher
    servicer: TrainerServicer

    def register(self, server: grpc.Server) -> list[str]:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self.servicer, server)
        return [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name]

    def start(self) -> None:
        self.intake.start()
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        self.intake.stop()
        self.close_clients()
        self.publisher.close(timeout=self.config.shutdown_grace_seconds)

    def close_clients(self) -> None:
        """Stage-specific clients to close after the loop stopped using them."""
