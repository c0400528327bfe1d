"""Stopping the ppo stage on a real broker, with a real reward service over loopback: a running
PPO iteration is given up at its next step instead of trained to the end (one can take a minute
on a CPU), nothing of it is published, and the restarted stage reads its prompts again."""

import logging
import time
import uuid

from rlhf.checkpoints import POLICY, PPO_STATE, CheckpointStore
from rlhf.models import TINY
from rlhf.v1 import events_pb2
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from services.trainer.ppo.service import PPOTrainerService
from services.trainer.servicer import TRAINING
from tests.conftest import publish_events, serve, trainer_config, wait_until

PROMPTS = 4


def _rated_prompts() -> list[events_pb2.GenerationEvent | events_pb2.FeedbackEvent]:
    """PROMPTS generations with a thumb each, as the generation and feedback services write them."""
    events: list[events_pb2.GenerationEvent | events_pb2.FeedbackEvent] = []
    for row in range(PROMPTS):
        gid = f"ppo-stop-{row}"
        generation = events_pb2.GenerationEvent(
            generation_id=gid,
            prompt=f"question {row}",
            prompt_token_ids=[5 + row, 6, 7],
            response="an answer",
        )
        generation.created_at.FromSeconds(int(time.time()))
        feedback = events_pb2.FeedbackEvent(
            event_id=f"e-{gid}", feedback=events_pb2.Feedback(generation_id=gid, thumb=1)
        )
        events += [generation, feedback]
    return events


def test_a_stop_gives_a_running_ppo_iteration_up_and_a_restart_reads_its_prompts_again(
    own_broker, cache_dir, tmp_path, caplog
):
    store = CheckpointStore(tmp_path / "checkpoints")
    reward = serve(
        RewardService(
            RewardConfig(
                kafka_bootstrap=own_broker.bootstrap,
                checkpoint_dir=store.root,
                reward_model=TINY,
                drift_sample=0.0,
            )
        )
    )
    config = trainer_config(
        {"kafka_bootstrap": own_broker.bootstrap, "checkpoint_dir": store.root},
        RLHF_POLICY_MODEL=TINY,
        RLHF_REWARD_ADDRESS=f"127.0.0.1:{reward.port}",
        RLHF_TRAINER_GROUP=f"ppo-stop-{uuid.uuid4().hex[:8]}",
        RLHF_PPO_MIN_REWARD_VERSION=0,  # the untrained reward head scores: plumbing, not quality
        RLHF_PPO_BATCH_SIZE=2,
        RLHF_PPO_MINIBATCH_SIZE=1,
        RLHF_PPO_RESPONSE_TOKENS=8,
        # 10,000 minibatch steps: an update that ends only if the stop gives it up (or after
        # minutes, publishing a policy, which the assertions below would see).
        RLHF_PPO_EPOCHS=5_000,
    )
    service = PPOTrainerService(config)
    learner = service.loop.learner
    try:
        service.start()
        publish_events(own_broker.bootstrap, _rated_prompts())
        assert wait_until(lambda: service.loop.status.phase == TRAINING, timeout=60)
        assert wait_until(lambda: bool(learner.optimizer.state), timeout=60), "no update began"
    finally:
        with caplog.at_level(logging.INFO, logger="services.trainer.ppo.loop"):
            service.stop()
            service.close_clients()
    assert "ppo stage: iteration given up on stop (update given up on stop after" in caplog.text
    assert learner.updates == 0 and service.loop.status.policy_version == 0
    assert store.versions(POLICY) == [] and store.versions(PPO_STATE) == []

    again = PPOTrainerService(config)
    again.intake.start()
    try:
        # The given-up batch's offsets were never committed: every prompt is read again.
        assert wait_until(lambda: again.loop.status.pending_prompts == PROMPTS, timeout=60), (
            f"the restart has {again.loop.status.pending_prompts} of {PROMPTS} prompts"
        )
    finally:
        again.stop()
        again.close_clients()
        reward.stop()
