"""Generation service entry point: `rlhf-generation --help` lists its settings."""

from __future__ import annotations

import grpc

from rlhf import bus
from rlhf.bus import Publisher
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.ids import GenerationIdSigner
from rlhf.models import load_base_policy, load_tokenizer, policy_from_checkpoint
from rlhf.server import run_main
from rlhf.serving import CheckpointFollower, HotSwap, latest_or_base
from rlhf.v1 import generation_pb2, generation_pb2_grpc

from .config import GenerationConfig
from .servicer import GenerationServicer


class GenerationService:
    name = "generation"

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        store = CheckpointStore(config.checkpoint_dir)
        self.tokenizer = load_tokenizer(config.cache_dir)
        initial = latest_or_base(
            store,
            POLICY,
            policy_from_checkpoint,
            lambda: load_base_policy(config.policy_model, config.cache_dir),
        )
        self.policy = HotSwap(POLICY, initial)
        self.publisher = Publisher(config.kafka_bootstrap, client_id="generation")
        self.follower = CheckpointFollower(
            self.policy,
            store,
            policy_from_checkpoint,
            config.kafka_bootstrap,
            bus.POLICY_CHECKPOINTS,
            client_id="generation-follower",
        )
        self.servicer = GenerationServicer(
            config,
            self.policy,
            self.tokenizer,
            self.publisher,
            GenerationIdSigner(config.generation_id_key.encode()),
            config.policy_model,
        )

    def register(self, server: grpc.Server) -> list[str]:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        return [generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name]

    def start(self) -> None:
        self.follower.start()

    def stop(self) -> None:
        self.follower.stop()
        self.publisher.close(timeout=self.config.shutdown_grace_seconds)


def main() -> None:
    run_main(
        "generation",
        GenerationConfig,
        GenerationService,
        "Serve the policy over gRPC, sign generation ids and follow policy checkpoints.",
    )


if __name__ == "__main__":
    main()
