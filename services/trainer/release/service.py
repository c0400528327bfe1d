"""The release stage's process: the intake of checkpoints, releases and thumbs, restored from
the newest release state, the offline gate (which loads the policies it compares, and the
reference, only when a new policy comes to be compared) and the controller."""

from __future__ import annotations

from rlhf.auth import ClientSecurity
from rlhf.checkpoints import POLICY, RELEASE_STATE, CheckpointStore
from rlhf.clients import RewardClient
from rlhf.models import load_base_policy, load_tokenizer, serving_dtype
from rlhf.training.release_gate import load_prompts

from ..config import TrainerConfig
from ..ppo.service import load_reference
from ..stage import StageService
from .gate import ReleaseGate
from .loop import ReleaseController, ReleaseIntake, release_consumer


def release_gate(
    config: TrainerConfig, store: CheckpointStore, reward: RewardClient
) -> ReleaseGate:
    """The gate on the release settings: the reference is the ppo stage's
    (RLHF_PPO_REFERENCE_VERSION), the reward service the one it trains against."""
    settings = config.release
    return ReleaseGate(
        store,
        lambda: load_tokenizer(config.cache_dir),
        lambda: load_base_policy(config.policy_model, config.cache_dir),
        lambda: load_reference(config, store),
        reward,
        load_prompts(settings.gate_prompts),
        settings.gate_samples,
        settings.gate_max_new_tokens,
        settings.tolerance(),
        serving_dtype(settings.gate_dtype),
    )


class ReleaseTrainerService(StageService):
    """The trainer process running the release stage (RLHF_TRAINER_STAGE=release)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        settings = config.release
        store = CheckpointStore(config.checkpoint_dir)
        parts = self.open_intake(
            store,
            settings.consumer_group,
            "release-trainer",
            ReleaseIntake,
            RELEASE_STATE,
            # Policies are the other stages' to prune; this one only reads them.
            keep_checkpoints=False,
            consumer=lambda publisher: release_consumer(
                config.kafka_bootstrap,
                settings.consumer_group,
                publisher,
                config.max_poll_interval_ms,
            ),
        )
        # What a generation replica serves before it reads any release: the newest policy.
        start_version = store.latest_version(POLICY) or 0
        self.reward: RewardClient | None = None
        gate = None
        if settings.gate:
            self.reward = RewardClient(
                config.ppo.reward_address, security=ClientSecurity.of(config)
            )
            gate = release_gate(config, store, self.reward)
        loop = ReleaseController(
            parts, settings.test(), settings.canary_share, start_version, gate, settings.min_ahead
        )
        self.serve(loop, store)

    def close_clients(self) -> None:
        if self.reward is not None:
            self.reward.close()
