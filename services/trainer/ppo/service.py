"""The ppo stage's process: the learner resumed from the store, the intake, the loop, and under
torchrun the other ranks (`run_follower`)."""

from __future__ import annotations

import torch

from rlhf import bus
from rlhf.auth import ClientSecurity
from rlhf.canary import RollbackWatch
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.clients import GenerationClient, RewardClient
from rlhf.config import ConfigError
from rlhf.models import load_base_policy, load_tokenizer, policy_from_checkpoint
from rlhf.server import configure_logging, keep_heap, lower_priority
from rlhf.serving import CheckpointEvents
from rlhf.training import distributed
from rlhf.training.distributed import World
from rlhf.training.online import PPOLearner
from rlhf.training.pool import PoolSampler
from rlhf.v1 import events_pb2

from ..config import TrainerConfig
from ..stage import StageService
from .intake import Intake
from .lockstep import Lockstep, follow
from .loop import LoopSettings, TrainingLoop
from .state import Resumed, resume

MAX_PPO_PROMPT_TOKENS = 512


def load_reference(config: TrainerConfig, store: CheckpointStore) -> torch.nn.Module:
    """The frozen model the KL penalty measures against: the base model, or a policy version
    from the store (typically what the sft stage produced)."""
    if config.ppo.reference_version == 0:
        return load_base_policy(config.policy_model, config.cache_dir)
    return policy_from_checkpoint(store.load(POLICY, config.ppo.reference_version))


def pool_client(config: TrainerConfig) -> GenerationClient | None:
    """The generation pool's client when rollouts are sampled there (RLHF_PPO_ROLLOUTS=pool)."""
    if config.ppo.rollouts != "pool":
        return None
    return GenerationClient(config.ppo.pool_address, security=ClientSecurity.of(config))


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
        max_policy_lag=config.ppo.max_policy_lag,
        max_wait=config.ppo.pool_wait_seconds,
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
            config.ppo.algorithm,
            config.ppo.rollout,
            config.ppo.lora,
            world,
            sampler,
        )

    return resume(
        store,
        lambda: load_base_policy(config.policy_model, config.cache_dir),
        make_learner,
        config.ppo.lora.rank,
        config.ppo.algorithm.algorithm,
    )


def reward_client(config: TrainerConfig) -> RewardClient:
    """The reward service's client; it scores a batch again while the served reward model is
    older than RLHF_PPO_MIN_REWARD_VERSION, and gives up after a while (the batch is retried)."""
    return RewardClient(
        config.ppo.reward_address,
        min_model_version=config.ppo.min_reward_version,
        security=ClientSecurity.of(config),
    )


def join_world(config: TrainerConfig) -> World:
    """The torchrun world (a world of one without torchrun), checked against the config."""
    world = distributed.join(config.ppo.dist_backend, strategy=config.ppo.dist_strategy)
    if world.distributed and config.stage != "ppo":
        raise ConfigError(f"only the ppo stage runs data parallel, not {config.stage!r}")
    batch, minibatch = config.ppo.batch_size, config.ppo.algorithm.minibatch_size
    if batch % world.size or minibatch % world.size:
        raise ConfigError(
            f"RLHF_PPO_BATCH_SIZE={batch} and RLHF_PPO_MINIBATCH_SIZE={minibatch} must split "
            f"evenly over {world.size} ranks"
        )
    return world


def rollback_follower(config: TrainerConfig, loop: TrainingLoop) -> CheckpointEvents:
    """Reads the release topic (every event, in order, no consumer group) and hands each
    canary rollback to `loop.follow_rollback` (RLHF_PPO_FOLLOW_ROLLBACKS)."""
    watch = RollbackWatch()

    def see(event: events_pb2.ReleaseEvent) -> None:
        ended = watch.see(event)
        if ended is not None:
            loop.follow_rollback(ended)

    return CheckpointEvents(
        config.kafka_bootstrap, bus.RELEASES, "trainer-releases", see, events_pb2.ReleaseEvent
    )


class PPOTrainerService(StageService):
    """The trainer process running the ppo stage (RLHF_TRAINER_STAGE=ppo); under torchrun,
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
        parts = self.open_intake(
            store,
            config.ppo.consumer_group,
            "trainer",
            lambda consumer: Intake(
                consumer,
                MAX_PPO_PROMPT_TOKENS,
                config.ppo.max_staleness_seconds,
                newest_first=config.ppo.prompt_order == "newest",
            ),
        )
        if resumed.intake is not None:  # saved with the policy, read by `resume`
            self.intake.restore(resumed.intake)
        self.reward = reward_client(config)
        loop = TrainingLoop(
            parts,
            learner or resumed.learner,
            self.reward,
            LoopSettings(
                batch_size=config.ppo.batch_size,
                publish_every=config.ppo.publish_every,
                kl_alarm=config.ppo.kl_alarm,
                min_reward_version=config.ppo.min_reward_version,
                metrics_log=config.metrics_log_path(),
                # The reference must outlive pruning: a restarted trainer loads it again.
                protect=frozenset({config.ppo.reference_version} - {0}),
            ),
            start_version=resumed.policy_version,
            lora_base_version=resumed.lora_base_version,
            reward_version=self.reward.model_version,
            base_policy=lambda: load_base_policy(config.policy_model, config.cache_dir),
        )
        self.serve(loop, store)
        self.lockstep = learner
        self.releases = rollback_follower(config, loop) if config.ppo.follow_rollbacks else None

    def start(self) -> None:
        super().start()
        if self.releases is not None:
            self.releases.start()

    def stop(self) -> None:
        if self.releases is not None:
            self.releases.stop()
        super().stop()
        if self.lockstep is not None:  # the loop has stopped: release the followers
            self.lockstep.stop()
            distributed.leave()

    def close_clients(self) -> None:
        self.reward.close()
        if self.generation is not None:
            self.generation.close()


def run_follower(config: TrainerConfig) -> None:
    """A rank > 0 of the distributed ppo stage: rank 0's commands on this rank's shard, until
    rank 0 stops. No gRPC port and no Kafka; it scores its shard on the reward service."""
    configure_logging("trainer")
    lower_priority(config.nice)
    keep_heap(config.heap_keep_mb)
    world = join_world(config)
    store = CheckpointStore(config.checkpoint_dir)
    generation = pool_client(config)  # each rank samples its shard on the pool
    learner = resume_learner(config, store, world, pool_sampler(config, store, generation)).learner
    reward = reward_client(config)
    try:
        follow(learner, world, reward)
    finally:
        reward.close()
        if generation is not None:
            generation.close()
        distributed.leave()
