"""The pool rollout settings of the ppo stage: defaults, refusals, and what they build."""

import pytest

from rlhf.checkpoints import CheckpointStore
from rlhf.config import ConfigError, load_config
from rlhf.training.pool import PoolSampler
from services.trainer.config import TrainerConfig
from services.trainer.ppo.service import pool_client, pool_sampler


def test_rollouts_are_sampled_in_process_unless_asked():
    config = load_config(TrainerConfig, {})
    assert config.ppo.rollouts == "local" and pool_client(config) is None
    assert config.ppo.max_policy_lag == 1 and config.ppo.algorithm.importance_cap == 2.0


def test_pool_settings_build_a_sampler_with_the_bound(tmp_path):
    config = load_config(
        TrainerConfig,
        {
            "RLHF_PPO_ROLLOUTS": "pool",
            "RLHF_PPO_POOL_ADDRESS": "127.0.0.1:1",
            "RLHF_PPO_MAX_POLICY_LAG": "0",
            "RLHF_PPO_IS_CAP": "3.5",
        },
    )
    client = pool_client(config)
    try:
        sampler = pool_sampler(config, CheckpointStore(tmp_path), client)
        assert isinstance(sampler, PoolSampler) and sampler.max_policy_lag == 0
        assert config.ppo.algorithm.importance_cap == 3.5
    finally:
        client.close()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RLHF_PPO_ROLLOUTS": "tgi"}, "RLHF_PPO_ROLLOUTS"),
        ({"RLHF_PPO_ROLLOUTS": "pool", "RLHF_PPO_POOL_ADDRESS": ""}, "RLHF_PPO_POOL_ADDRESS"),
        ({"RLHF_PPO_MAX_POLICY_LAG": "-1"}, "RLHF_PPO_MAX_POLICY_LAG"),
        ({"RLHF_PPO_IS_CAP": "0.9"}, "RLHF_PPO_IS_CAP"),
        ({"RLHF_PPO_POOL_WAIT_SECONDS": "0"}, "RLHF_PPO_POOL_WAIT_SECONDS"),
    ],
)
def test_unusable_pool_settings_are_refused_by_name(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainerConfig, env)
