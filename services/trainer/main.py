"""Trainer entry point: `rlhf-trainer --help` lists its settings; RLHF_TRAINER_STAGE picks the
stage (ppo: `TrainerService`, reward: `reward_stage.RewardTrainerService`, sft:
`sft_stage.SFTTrainerService`)."""

from __future__ import annotations

import torch

from rlhf import bus
from rlhf.bus import EventConsumer, Publisher
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.clients import GenerationClient, RewardClient
from rlhf.config import ConfigError, parse_args
from rlhf.models import load_base_policy, load_tokenizer, policy_from_checkpoint
from rlhf.server import Service, configure_logging, run_main
from rlhf.training import distributed
from rlhf.training.distributed import World
from rlhf.training.online import LoraSettings, PPOLearner, RolloutSettings
from rlhf.training.pool import PoolSampler
from rlhf.training.ppo import PPOConfig
from rlhf.v1 import events_pb2

from .config import TrainerConfig
from .lockstep import Lockstep, follow
from .loop import Intake, LoopSettings, TrainingLoop
from .ppo_state import Resumed, resume
from .reward_stage import RewardTrainerService
from .servicer import StageService, TrainerServicer
from .sft_stage import SFTTrainerService

MAX_PPO_PROMPT_TOKENS = 512
DESCRIPTION = (
    "Join generations with feedback and train: PPO against the reward service, publishing "
    "policies (RLHF_TRAINER_STAGE=ppo; data parallel under torchrun); the reward model, "
    "publishing reward models (RLHF_TRAINER_STAGE=reward); or supervised fine-tuning on "
    "corrections and a demonstrations file (RLHF_TRAINER_STAGE=sft)."
)


def ppo_config(config: TrainerConfig) -> PPOConfig:
    return PPOConfig(
        ppo_epochs=config.ppo_epochs,
        minibatch_size=config.minibatch_size,
        learning_rate=config.learning_rate,
        temperature=config.temperature,
        init_kl_coef=config.init_kl_coef,
        target_kl=config.target_kl,
        seed=config.seed,
        importance_cap=config.importance_cap,
    )


def load_reference(config: TrainerConfig, store: CheckpointStore) -> torch.nn.Module:
    """The frozen model the KL penalty measures against: the base model, or a policy version
    from the store (typically what the sft stage produced)."""
    if config.reference_version == 0:
        return load_base_policy(config.policy_model, config.cache_dir)
    return policy_from_checkpoint(store.load(POLICY, config.reference_version))


def pool_client(config: TrainerConfig) -> GenerationClient | None:
    """The generation pool's client when rollouts are sampled there (RLHF_PPO_ROLLOUTS=pool)."""
    return GenerationClient(config.pool_address) if config.rollouts == "pool" else None


def pool_sampler(
    config: TrainerConfig, store: CheckpointStore, client: GenerationClient | None
) -> PoolSampler | None:
    """Rollouts on the pool, within RLHF_PPO_MAX_POLICY_LAG versions of the newest policy in
    the store: the trainer's latest published version (it writes a policy before announcing
    it, and sft, which also writes policies, does not run beside ppo)."""
    if client is None:
        return None
    return PoolSampler(
        client,
        lambda: store.latest_version(POLICY) or 0,
        max_policy_lag=config.max_policy_lag,
        max_wait=config.pool_wait_seconds,
    )


def resume_learner(
    config: TrainerConfig,
    store: CheckpointStore,
    world: World,
    sampler: PoolSampler | None = None,
) -> Resumed:
    """The PPO learner continuing from the newest policy and its trainer state (every rank
    builds the same one; the reference stays what RLHF_PPO_REFERENCE_VERSION says); `sampler`
    samples its rollouts on the generation pool, None in process."""
    tokenizer = load_tokenizer(config.cache_dir)
    reference = load_reference(config, store).to(world.device)

    def make_learner(weights: torch.nn.Module) -> PPOLearner:
        return PPOLearner(
            # Sharding moves each rank's slices to its device: the whole policy need not fit.
            weights if world.sharded else weights.to(world.device),
            reference,
            tokenizer,
            ppo_config(config),
            RolloutSettings(max_new_tokens=config.response_tokens, seed=config.seed),
            LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha),
            world,
            sampler,
        )

    return resume(
        store,
        lambda: load_base_policy(config.policy_model, config.cache_dir),
        make_learner,
        config.lora_rank,
    )


def join_world(config: TrainerConfig) -> World:
    """The torchrun world (a world of one without torchrun), checked against the config."""
    world = distributed.join(config.dist_backend, strategy=config.dist_strategy)
    if world.distributed and config.stage != "ppo":
        raise ConfigError(f"only the ppo stage runs data parallel, not {config.stage!r}")
    if config.batch_size % world.size or config.minibatch_size % world.size:
        raise ConfigError(
            f"RLHF_PPO_BATCH_SIZE={config.batch_size} and RLHF_PPO_MINIBATCH_SIZE="
            f"{config.minibatch_size} must split evenly over {world.size} ranks"
        )
    return world


class TrainerService(StageService):
    """The trainer process running the PPO stage (RLHF_TRAINER_STAGE=ppo); under torchrun,
    rank 0 (the followers run `run_follower`)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.world = join_world(config)
        store = CheckpointStore(config.checkpoint_dir)
        self.generation = pool_client(config)
        resumed = resume_learner(
            config, store, self.world, pool_sampler(config, store, self.generation)
        )
        learner = Lockstep(resumed.learner, self.world) if self.world.distributed else None
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
            learner or resumed.learner,
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
        self.lockstep = learner
        self.servicer = TrainerServicer(self.loop, store, POLICY)

    def stop(self) -> None:
        super().stop()
        if self.lockstep is not None:  # the loop has stopped: release the followers
            self.lockstep.stop()
            distributed.leave()

    def close_clients(self) -> None:
        self.reward.close()
        if self.generation is not None:
            self.generation.close()


def run_follower(config: TrainerConfig) -> None:
    """A rank > 0 of the distributed PPO stage: rank 0's commands on this rank's shard, until
    rank 0 stops. No gRPC port and no Kafka; it scores its shard on the reward service."""
    configure_logging("trainer")
    world = join_world(config)
    store = CheckpointStore(config.checkpoint_dir)
    generation = pool_client(config)  # each rank samples its shard on the pool
    learner = resume_learner(config, store, world, pool_sampler(config, store, generation)).learner
    reward = RewardClient(config.reward_address)
    try:
        follow(learner, world, reward)
    finally:
        reward.close()
        if generation is not None:
            generation.close()
        distributed.leave()


def build(config: TrainerConfig) -> Service:
    """The service for the configured stage; both share the bootstrap and control plane."""
    if config.stage == "reward":
        return RewardTrainerService(config)
    if config.stage == "sft":
        return SFTTrainerService(config)
    return TrainerService(config)


def main() -> None:
    if distributed.launched_rank() > 0:  # torchrun's other ranks follow rank 0
        return run_follower(parse_args(TrainerConfig, DESCRIPTION))
    run_main(
        "trainer",
        TrainerConfig,
        build,
        DESCRIPTION,
    )


if __name__ == "__main__":
    main()
