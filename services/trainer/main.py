"""Trainer entry point: `rlhf-trainer --help` lists its settings; RLHF_TRAINER_STAGE picks the
stage (ppo: `TrainerService`, reward: `reward_stage.RewardTrainerService`, sft:
`sft_stage.SFTTrainerService`)."""

from __future__ import annotations

import torch

from rlhf import bus
from rlhf.bus import EventConsumer, Publisher
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.clients import RewardClient
from rlhf.models import load_base_policy, load_tokenizer, policy_from_checkpoint
from rlhf.server import Service, run_main
from rlhf.training.online import LoraSettings, PPOLearner, RolloutSettings
from rlhf.training.ppo import PPOConfig
from rlhf.v1 import events_pb2

from .config import TrainerConfig
from .loop import Intake, LoopSettings, TrainingLoop
from .ppo_state import resume
from .reward_stage import RewardTrainerService
from .servicer import StageService, TrainerServicer
from .sft_stage import SFTTrainerService

MAX_PPO_PROMPT_TOKENS = 512


def ppo_config(config: TrainerConfig) -> PPOConfig:
    return PPOConfig(
        ppo_epochs=config.ppo_epochs,
        minibatch_size=config.minibatch_size,
        learning_rate=config.learning_rate,
        temperature=config.temperature,
        init_kl_coef=config.init_kl_coef,
        target_kl=config.target_kl,
        seed=config.seed,
    )


def load_reference(config: TrainerConfig, store: CheckpointStore) -> torch.nn.Module:
    """The frozen model the KL penalty measures against: the base model, or a policy version
    from the store (typically what the sft stage produced)."""
    if config.reference_version == 0:
        return load_base_policy(config.policy_model, config.cache_dir)
    return policy_from_checkpoint(store.load(POLICY, config.reference_version))


class TrainerService(StageService):
    """The trainer process running the PPO stage (RLHF_TRAINER_STAGE=ppo)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        store = CheckpointStore(config.checkpoint_dir)
        tokenizer = load_tokenizer(config.cache_dir)
        reference = load_reference(config, store)

        def make_learner(weights: torch.nn.Module) -> PPOLearner:
            return PPOLearner(
                weights,
                reference,
                tokenizer,
                ppo_config(config),
                RolloutSettings(max_new_tokens=config.response_tokens, seed=config.seed),
                LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha),
            )

        # Continue from the newest policy and its trainer state; the reference stays the base.
        resumed = resume(
            store,
            lambda: load_base_policy(config.policy_model, config.cache_dir),
            make_learner,
            config.lora_rank,
        )
        self.publisher = Publisher(config.kafka_bootstrap, client_id="trainer")
        consumer = EventConsumer(
            config.kafka_bootstrap,
            {bus.GENERATIONS: events_pb2.GenerationEvent, bus.FEEDBACK: events_pb2.FeedbackEvent},
            group_id=config.consumer_group,
            dead_letters=self.publisher,
            client_id="trainer",
            max_poll_interval_ms=config.max_poll_interval_ms,
        )
        self.reward = RewardClient(config.reward_address)
        self.intake = Intake(consumer, MAX_PPO_PROMPT_TOKENS, config.max_staleness_seconds)
        if resumed.intake is not None:
            self.intake.restore(resumed.intake)
        self.loop = TrainingLoop(
            resumed.learner,
            self.intake,
            self.reward,
            store,
            self.publisher,
            LoopSettings(
                batch_size=config.batch_size,
                publish_every=config.publish_every,
                keep_checkpoints=config.keep_checkpoints,
                keep_states=config.keep_states,
                kl_alarm=config.kl_alarm,
                metrics_log=config.metrics_log_path(),
                # The reference must outlive pruning: a restarted trainer loads it again.
                protect=frozenset({config.reference_version} - {0}),
            ),
            start_version=resumed.policy_version,
            lora_base_version=resumed.lora_base_version,
        )
        self.servicer = TrainerServicer(self.loop, store, POLICY)

    def close_clients(self) -> None:
        self.reward.close()


def build(config: TrainerConfig) -> Service:
    """The service for the configured stage; both share the bootstrap and control plane."""
    if config.stage == "reward":
        return RewardTrainerService(config)
    if config.stage == "sft":
        return SFTTrainerService(config)
    return TrainerService(config)


def main() -> None:
    run_main(
        "trainer",
        TrainerConfig,
        build,
        "Join generations with feedback and train: PPO against the reward service, publishing "
        "policies (RLHF_TRAINER_STAGE=ppo); the reward model, publishing reward models "
        "(RLHF_TRAINER_STAGE=reward); or supervised fine-tuning on corrections and a "
        "demonstrations file (RLHF_TRAINER_STAGE=sft).",
    )


if __name__ == "__main__":
    main()
