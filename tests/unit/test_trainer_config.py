"""The trainer's configuration: stages, each stage's group of settings, and every algorithm knob
settable from the environment."""

import dataclasses
import typing

import pytest
import torch

from rlhf.config import ConfigError, load_config
from rlhf.models import DTYPES
from rlhf.training.online import LoraSettings, RolloutSettings
from rlhf.training.ppo_config import ALGORITHMS, KL_ESTIMATORS, LOSS_AGGREGATIONS, PPOConfig
from services.trainer.config import TrainerConfig


def test_ppo_is_the_default_stage_and_reward_and_sft_are_accepted():
    assert load_config(TrainerConfig, {}).stage == "ppo"
    for stage in ("reward", "sft"):
        assert load_config(TrainerConfig, {"RLHF_TRAINER_STAGE": stage}).stage == stage


def test_an_unknown_stage_is_refused_by_name():
    with pytest.raises(ConfigError, match="RLHF_TRAINER_STAGE"):
        load_config(TrainerConfig, {"RLHF_TRAINER_STAGE": "dpo"})


@pytest.mark.parametrize(
    "env", [{"RLHF_PPO_LORA_RANK": "-1"}, {"RLHF_PPO_MAX_STALENESS_SECONDS": "0"}]
)
def test_unusable_ppo_settings_are_refused(env):
    with pytest.raises(ConfigError):
        load_config(TrainerConfig, env)


def test_the_metrics_log_defaults_beside_the_checkpoints_and_can_be_turned_off(tmp_path):
    config = load_config(TrainerConfig, {"RLHF_CHECKPOINT_DIR": str(tmp_path)})
    assert config.metrics_log_path() == tmp_path / "logs" / "ppo.jsonl"
    assert (
        load_config(TrainerConfig, {"RLHF_TRAINER_METRICS_LOG": "off"}).metrics_log_path() is None
    )


@pytest.mark.parametrize(
    "env",
    [
        {"RLHF_REWARD_HELDOUT_FRACTION": "1.0"},
        {"RLHF_REWARD_STEPS_PER_ROUND": "0"},
        {"RLHF_REWARD_DESIRABLE_WEIGHT": "0"},
        {"RLHF_REWARD_TOLERANCE": "-0.1"},
        {"RLHF_REWARD_TOLERANCE": "2"},
    ],
)
def test_unusable_reward_settings_are_refused(env):
    with pytest.raises(ConfigError):
        load_config(TrainerConfig, {"RLHF_TRAINER_STAGE": "reward", **env})


def test_reward_settings_reach_the_training_loop():
    config = load_config(
        TrainerConfig,
        {
            "RLHF_TRAINER_STAGE": "reward",
            "RLHF_REWARD_LEARNING_RATE": "3e-4",
            "RLHF_REWARD_STEPS_PER_ROUND": "12",
            "RLHF_REWARD_TRAINABLE_LAYERS": "-1",
            "RLHF_REWARD_MIN_HELDOUT": "7",
            "RLHF_REWARD_UNDESIRABLE_WEIGHT": "2.5",
            "RLHF_SEED": "9",
        },
    )
    training = config.reward.training
    assert training.learning_rate == 3e-4 and training.steps_per_round == 12
    assert training.trainable_layers == -1 and training.min_heldout == 7
    assert training.undesirable_weight == 2.5 and training.seed == 9


def test_the_kl_reference_can_be_a_policy_version_from_the_store(tmp_path, cache_dir):
    from rlhf.checkpoints import POLICY, CheckpointError, CheckpointStore
    from rlhf.models import TINY, load_base_policy, policy_checkpoint_files
    from services.trainer.ppo.service import load_reference

    store = CheckpointStore(tmp_path)
    tuned = load_base_policy(TINY, cache_dir, seed=7)
    store.write(POLICY, *policy_checkpoint_files(tuned))
    env = {"RLHF_CHECKPOINT_DIR": str(tmp_path), "RLHF_CACHE_DIR": str(cache_dir)}
    env["RLHF_POLICY_MODEL"] = TINY
    base = load_reference(load_config(TrainerConfig, env), store)
    reference = load_reference(
        load_config(TrainerConfig, {**env, "RLHF_PPO_REFERENCE_VERSION": "1"}), store
    )
    name = "model.embed_tokens.weight"
    assert torch.equal(reference.state_dict()[name], tuned.state_dict()[name])
    assert not torch.equal(base.state_dict()[name], tuned.state_dict()[name])
    with pytest.raises(CheckpointError):
        load_reference(
            load_config(TrainerConfig, {**env, "RLHF_PPO_REFERENCE_VERSION": "9"}), store
        )


def test_the_data_parallel_strategy_is_ddp_unless_fsdp_is_asked_with_pool_rollouts():
    assert load_config(TrainerConfig, {}).ppo.dist_strategy == "ddp"
    pool = {"RLHF_PPO_ROLLOUTS": "pool", "RLHF_PPO_POOL_ADDRESS": "127.0.0.1:1"}
    config = load_config(TrainerConfig, {**pool, "RLHF_DIST_STRATEGY": "fsdp"})
    assert config.ppo.dist_strategy == "fsdp"


def test_ppo_batches_take_the_newest_prompts_unless_told_oldest():
    assert load_config(TrainerConfig, {}).ppo.prompt_order == "newest"
    assert load_config(TrainerConfig, {"RLHF_PPO_PROMPT_ORDER": "oldest"}).ppo.prompt_order == (
        "oldest"
    )
    with pytest.raises(ConfigError, match="RLHF_PPO_PROMPT_ORDER='random': expected one of"):
        load_config(TrainerConfig, {"RLHF_PPO_PROMPT_ORDER": "random"})


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RLHF_DIST_STRATEGY": "zero3"}, "expected one of"),
        # In-process sampling would hang the sharded layers' collectives.
        ({"RLHF_DIST_STRATEGY": "fsdp"}, "RLHF_PPO_ROLLOUTS=pool"),
        (
            {
                "RLHF_DIST_STRATEGY": "fsdp",
                "RLHF_PPO_ROLLOUTS": "pool",
                "RLHF_PPO_LORA_RANK": "8",
            },
            "LoRA",
        ),
    ],
)
def test_unusable_strategies_are_refused_by_name(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainerConfig, env)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RLHF_PPO_ALGORITHM": "a2c"}, "RLHF_PPO_ALGORITHM='a2c'"),
        # A baseline from the other answers needs other answers.
        ({"RLHF_PPO_ALGORITHM": "rloo", "RLHF_PPO_GROUP_SIZE": "1"}, "at least 2 answers"),
        ({"RLHF_PPO_LOSS_AGGREGATION": "batch"}, "RLHF_PPO_LOSS_AGGREGATION"),
        ({"RLHF_PPO_DTYPE": "float16"}, "RLHF_PPO_DTYPE='float16'"),
        ({"RLHF_PPO_MIN_KL_COEF": "-0.1"}, "RLHF_PPO_MIN_KL_COEF must be >= 0"),
    ],
)
def test_unusable_algorithm_settings_are_refused_by_name(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainerConfig, env)


def test_one_setting_selects_the_algorithm_and_ppo_ignores_the_group_size():
    grpo = load_config(TrainerConfig, {"RLHF_PPO_ALGORITHM": "grpo"}).ppo.algorithm
    assert grpo.critic_free and grpo.answers_per_prompt == 4
    ppo = load_config(TrainerConfig, {"RLHF_PPO_GROUP_SIZE": "1"}).ppo.algorithm
    assert not ppo.critic_free and ppo.answers_per_prompt == 1


def _other_value(field: dataclasses.Field, hint: type) -> object:
    """A valid value different from the field's default, by type."""
    default = field.default
    if hint is bool:
        return not default
    if hint is int:
        return default + 1
    if hint is float:
        return default * 0.5 if default else 0.5
    choices = {
        "kl_estimator": KL_ESTIMATORS,
        "algorithm": ALGORITHMS,
        "loss_aggregation": LOSS_AGGREGATIONS,
        "dtype": DTYPES,
    }
    if field.name in choices:
        return next(e for e in choices[field.name] if e != default)
    if hint == tuple[str, ...]:
        return ("q_proj",)
    raise AssertionError(f"no test value for {field.name}: {hint}")


@pytest.mark.parametrize(
    ("group", "cls"),
    [("algorithm", PPOConfig), ("rollout", RolloutSettings), ("lora", LoraSettings)],
)
def test_every_ppo_knob_is_a_setting_the_ppo_stage_reads(group, cls):
    """Each field of the PPO algorithm's config (and the rollouts' and LoRA's) is declared
    with an environment variable, and setting that variable reaches the ppo stage's config."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        assert "env" in field.metadata, f"{cls.__name__}.{field.name} is not a setting"
        value = _other_value(field, hints[field.name])
        shown = ",".join(value) if isinstance(value, tuple) else str(value)
        config = load_config(TrainerConfig, {field.metadata["env"]: shown})
        assert getattr(getattr(config.ppo, group), field.name) == value, field.name


def test_the_ppo_learner_is_built_from_the_stage_config(tmp_path, cache_dir):
    from rlhf.checkpoints import CheckpointStore
    from rlhf.models import TINY
    from rlhf.training.distributed import World
    from services.trainer.ppo.service import resume_learner

    env = {
        "RLHF_POLICY_MODEL": TINY,
        "RLHF_CACHE_DIR": str(cache_dir),
        "RLHF_PPO_CLIP_RANGE": "0.3",
        "RLHF_PPO_RESPONSE_TOKENS": "5",
        "RLHF_PPO_LORA_RANK": "2",
    }
    config = load_config(TrainerConfig, env)
    learner = resume_learner(config, CheckpointStore(tmp_path), World()).learner
    assert learner.config is config.ppo.algorithm and learner.config.clip_range == 0.3
    assert learner.rollout_settings.max_new_tokens == 5 and learner.lora.rank == 2
