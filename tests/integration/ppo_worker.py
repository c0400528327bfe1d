"""A few PPO iterations of the tiny model on a fixed batch, for tests/integration/
test_distributed_ppo.py: run as one process, or under torchrun as data-parallel ranks.

Rank 0 (or the single process) writes the trained weights (safetensors) and the last
statistics (JSON) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlhf.config import CommonConfig, load_config
from rlhf.models import TINY, load_base_policy, load_tokenizer
from rlhf.training import distributed
from rlhf.training.online import LoraSettings, PPOLearner, RolloutSettings
from rlhf.training.ppo import PPOConfig
from services.trainer.lockstep import Lockstep, follow

BATCH = 8


def prompts() -> list[list[int]]:
    # Equal lengths: every rank pads its shard's prompts exactly as one process pads them all.
    return [[100 + row, 2000 + 7 * row, 31, 4000 + row] for row in range(BATCH)]


def score(prompt_texts: list[str], responses: list[str]) -> list[float]:
    """A programmatic reward: the share of vowels in the response."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def trainable(learner: PPOLearner) -> dict[str, torch.Tensor]:
    weights = {
        name: p.detach().clone().contiguous()
        for name, p in learner.policy.named_parameters()
        if p.requires_grad
    }
    value_head = learner.value_head.state_dict()
    return weights | {f"value_head.{k}": v.clone() for k, v in value_head.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(0)
    world = distributed.join()
    cache_dir = load_config(CommonConfig).cache_dir
    tokenizer = load_tokenizer(cache_dir)
    learner = PPOLearner(
        load_base_policy(TINY, cache_dir, seed=0),
        load_base_policy(TINY, cache_dir, seed=0),
        tokenizer,
        # One minibatch per epoch (the whole batch): the step is then exactly one process's.
        PPOConfig(ppo_epochs=2, minibatch_size=BATCH, learning_rate=3e-3, init_kl_coef=0.2),
        RolloutSettings(max_new_tokens=8, seed=0),
        LoraSettings(rank=args.lora_rank),
        world,
    )
    initial = trainable(learner)
    if not world.is_main:
        follow(learner, world, score)  # the trainer service's followers, as they run
        distributed.leave()
        return
    lead = Lockstep(learner, world)  # in a world of one, the learner itself
    stats = {}
    for _ in range(args.steps):
        stats = lead.iterate(prompts(), score)
    # Responses of unequal lengths (the tiny model's samples all run to the token limit): each
    # rank's share of the batch's tokens differs, which the losses' normalisation must undo.
    eos = tokenizer.eos_token_id
    responses = [[300 + row] * (1 + row) + [eos] for row in range(BATCH)]
    scores = [float(row % 3) for row in range(BATCH)]
    lead.update(prompts(), responses, scores)
    # A rollback to the base weights: every rank must continue from rank 0's weights.
    lead.rebase(load_base_policy(TINY, cache_dir, seed=0))
    stats = lead.update(prompts(), responses, scores)
    lead.stop()
    if world.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file(initial, str(args.out / "initial.safetensors"))
        save_file(trainable(learner), str(args.out / "trained.safetensors"))
        stats["kl_coef_after"] = learner.kl_controller.value
        stats["world_size"] = world.size
        (args.out / "stats.json").write_text(json.dumps(stats))
    distributed.leave()


if __name__ == "__main__":
    main()
