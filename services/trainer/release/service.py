"""The release stage's process: the intake of checkpoints, releases and thumbs, restored from
the newest release state, and the controller. No model is loaded."""

from __future__ import annotations

from rlhf.checkpoints import POLICY, RELEASE_STATE, CheckpointStore

from ..config import TrainerConfig
from ..stage import StageService
from .loop import ReleaseController, ReleaseIntake, release_consumer


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
        loop = ReleaseController(parts, settings.test(), settings.canary_share, start_version)
        self.serve(loop, store)
