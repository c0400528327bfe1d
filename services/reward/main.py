"""Reward service entry point: `rlhf-reward --help` lists its settings."""

from __future__ import annotations

import grpc

from rlhf import bus
from rlhf.checkpoints import REWARD, CheckpointStore
from rlhf.models import load_reward_backbone, reward_from_checkpoint
from rlhf.server import run_main
from rlhf.serving import CheckpointFollower, HotSwap, latest_or_base
from rlhf.v1 import reward_pb2, reward_pb2_grpc

from .config import RewardConfig
from .servicer import RewardServicer


class RewardService:
    name = "reward"

    def __init__(self, config: RewardConfig) -> None:
        store = CheckpointStore(config.checkpoint_dir)
        base, tokenizer = load_reward_backbone(config.reward_model)
        self.model = HotSwap(
            REWARD, latest_or_base(store, REWARD, reward_from_checkpoint, lambda: base)
        )
        self.follower = CheckpointFollower(
            self.model,
            store,
            reward_from_checkpoint,
            config.kafka_bootstrap,
            bus.REWARD_CHECKPOINTS,
            client_id="reward-follower",
        )
        self.servicer = RewardServicer(config, self.model, tokenizer)

    def register(self, server: grpc.Server) -> list[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)
        return [reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name]

    def start(self) -> None:
        self.follower.start()

    def stop(self) -> None:
        self.follower.stop()


def main() -> None:
    run_main("reward", RewardConfig, RewardService, "Score (prompt, response) pairs over gRPC.")


if __name__ == "__main__":
    main()
