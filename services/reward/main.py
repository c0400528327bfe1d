"""Reward service entry point: `rlhf-reward --help` lists its settings."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import bus
from rlhf.auth import READER, SERVICE, allow, rules
from rlhf.bus import EventConsumer
from rlhf.checkpoints import REWARD, CheckpointStore, VerifiedCheckpoint
from rlhf.drift import LiveRewardSampler
from rlhf.models import load_reward_backbone, on_own_thread, reward_from_checkpoint, serving_dtype
from rlhf.scoring import PromptResponse, ScoreBatcher, score_pairs
from rlhf.server import run_main
from rlhf.serving import CheckpointFollower, HotSwap, Served, latest_or_base
from rlhf.v1 import events_pb2, reward_pb2, reward_pb2_grpc

from .config import RewardConfig
from .servicer import RewardServicer

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
# The reward model is no open oracle: only the platform's services may score.
RULES = rules(SERVICE_NAME, {"Score": allow(SERVICE), "GetModelInfo": allow(SERVICE, READER)})


class RewardService:
    name = "reward"
    rules = RULES

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        store = CheckpointStore(config.checkpoint_dir)
        dtype = serving_dtype(config.dtype)

        # Every forward pass runs on the batcher's one thread; models are built on threads that
        # end (at start and on each hot swap), so that thread keeps the only OpenMP team.
        def build(checkpoint: VerifiedCheckpoint) -> PreTrainedModel:
            return on_own_thread(lambda: reward_from_checkpoint(checkpoint).to(dtype))

        def first() -> tuple[Served[PreTrainedModel], PreTrainedTokenizerBase]:
            base, tokenizer = load_reward_backbone(config.reward_model)
            return latest_or_base(store, REWARD, build, lambda: base.to(dtype)), tokenizer

        served, self.tokenizer = on_own_thread(first)
        self.model = HotSwap(REWARD, served)
        self.follower = CheckpointFollower(
            self.model,
            store,
            build,
            config.kafka_bootstrap,
            bus.REWARD_CHECKPOINTS,
            client_id="reward-follower",
        )
        self.batcher = ScoreBatcher(
            self.score_batch,
            max_batch=config.batch_max_pairs,
            max_wait_s=config.batch_wait_ms / 1000,
            max_queued=config.max_queued_pairs,
        )
        self.drift = self._drift_sampler(config) if config.drift_sample > 0 else None
        self.servicer = RewardServicer(config, self.batcher, self.model)

    def score_batch(self, pairs: Sequence[PromptResponse]) -> tuple[list[float], int]:
        """One forward pass with the model served right now; a hot swap lands between batches."""
        served = self.model.current()
        scores = score_pairs(served.model, self.tokenizer, pairs, self.config.reward_max_tokens)
        return scores, served.version

    def _drift_sampler(self, config: RewardConfig) -> LiveRewardSampler:
        consumer = EventConsumer(
            config.kafka_bootstrap,
            {bus.GENERATIONS: events_pb2.GenerationEvent},
            group_id=config.drift_group,
            client_id="reward-drift",
            from_beginning=False,  # drift is about live traffic, not the topic's history
            max_poll_interval_ms=config.max_poll_interval_ms,
        )
        return LiveRewardSampler(consumer, config.drift_sample, self.batcher.submit)

    def healthy(self) -> bool:
        return self.follower.healthy()

    def register(self, server: grpc.Server) -> list[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    def start(self) -> None:
        self.batcher.start()
        self.follower.start()
        if self.drift is not None:
            self.drift.start()

    def stop(self) -> None:
        if self.drift is not None:
            self.drift.stop()
        self.follower.stop()
        self.batcher.stop()


def main() -> None:
    run_main("reward", RewardConfig, RewardService, "Score (prompt, response) pairs over gRPC.")


if __name__ == "__main__":
    main()
