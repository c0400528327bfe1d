"""Trainer entry point: `rlhf-trainer --help` lists its settings; RLHF_TRAINER_STAGE picks the
stage (ppo: `TrainerService`, reward: `reward_stage.RewardTrainerService`)."""

from __future__ import annotations

from rlhf import bus
from rlhf.bus import EventConsumer, Publisher
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.clients import RewardClient
from rlhf.models import load_base_policy, load_tokenizer, policy_from_checkpoint
from rlhf.server import Service, run_main
from rlhf.serving import latest_or_base
from rlhf.training.online import PPOLearner, RolloutSettings
from rlhf.training.ppo import PPOConfig
from rlhf.v1 import events_pb2

from .config import TrainerConfig
from .loop import Intake, TrainingLoop
from .reward_stage import RewardTrainerService
from .servicer import StageService, TrainerServicer

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


class TrainerService(StageService):
    """The trainer process running the PPO stage (RLHF_TRAINER_STAGE=ppo)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        store = CheckpointStore(config.checkpoint_dir)
        tokenizer = load_tokenizer(config.cache_dir)
        reference = load_base_policy(config.policy_model, config.cache_dir)
        # Continue from the newest published policy; the reference stays the base model.
        current = latest_or_base(
            store,
            POLICY,
            policy_from_checkpoint,
            lambda: load_base_policy(config.policy_model, config.cache_dir),
        )
        learner = PPOLearner(
            current.model,
            reference,
            tokenizer,
            ppo_config(config),
            RolloutSettings(max_new_tokens=config.response_tokens, seed=config.seed),
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
        self.intake = Intake(consumer, MAX_PPO_PROMPT_TOKENS)
        self.loop = TrainingLoop(
            learner,
            self.intake,
            self.reward,
            store,
            self.publisher,
            batch_size=config.batch_size,
            publish_every=config.publish_every,
            start_version=current.version,
            keep_checkpoints=config.keep_checkpoints,
        )
        self.servicer = TrainerServicer(self.loop)

    def close_clients(self) -> None:
        self.reward.close()


def build(config: TrainerConfig) -> Service:
    """The service for the configured stage; both share the bootstrap and control plane."""
    if config.stage == "reward":
        return RewardTrainerService(config)
    return TrainerService(config)


def main() -> None:
    run_main(
        "trainer",
        TrainerConfig,
        build,
        "Join generations with feedback and train: PPO against the reward service, publishing "
        "policies (RLHF_TRAINER_STAGE=ppo), or the reward model, publishing reward models "
        "(RLHF_TRAINER_STAGE=reward).",
    )


if __name__ == "__main__":
    main()
