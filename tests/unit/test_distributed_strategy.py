"""The data-parallel strategy of a `World`: which worlds shard, and what the learner refuses
to shard. Sharded training itself runs under torchrun in
tests/integration/test_distributed_ppo.py."""

import pytest

from rlhf.models import TINY, load_base_policy, load_tokenizer
from rlhf.training import distributed
from rlhf.training.distributed import World
from rlhf.training.online import LoraSettings, PPOLearner, RolloutSettings
from rlhf.training.ppo_config import PPOConfig


def test_only_a_world_of_several_ranks_with_fsdp_is_sharded():
    assert not World().sharded and not World(strategy="fsdp").sharded
    assert not World(rank=1, size=2).sharded
    assert World(rank=1, size=2, strategy="fsdp").sharded


def test_join_refuses_an_unknown_strategy_and_a_world_of_one_keeps_it(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="zero3"):
        distributed.join(strategy="zero3")
    world = distributed.join(strategy="fsdp")
    # A plain process with fsdp configured trains unsharded: no process group is needed.
    assert world.strategy == "fsdp" and not world.distributed and not world.sharded


def test_the_learner_refuses_lora_when_sharded(cache_dir):
    # Refused before any collective, so no process group is needed to see it.
    with pytest.raises(ValueError, match="LoRA"):
        PPOLearner(
            load_base_policy(TINY, cache_dir, seed=0),
            load_base_policy(TINY, cache_dir, seed=0),
            load_tokenizer(cache_dir),
            PPOConfig(),
            RolloutSettings(),
            LoraSettings(rank=4),
            World(rank=0, size=2, strategy="fsdp"),
        )
