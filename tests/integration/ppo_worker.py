"""A few PPO iterations of the tiny model on a fixed batch, for tests/integration/
test_distributed_ppo.py: run as one process, or under torchrun as data-parallel ranks.

With --algorithm grpo or rloo the same, critic-free: every prompt gets a group of GROUP answers
(each rank samples its prompts' groups, seeded by their global rows), and the fixed batch's
rows are groups of GROUP consecutive answers to one prompt.

Rank 0 (or the single process) writes the trained weights (safetensors) and the last
statistics (JSON) to --out.

With --strategy fsdp the ranks shard the policy, which needs rollouts sampled elsewhere (the
pool), so the steps are updates on fixed responses only; then the learner's state takes a
round trip: gathered to rank 0, written, loaded by a fresh learner on every rank, which takes
one more update (resumed.safetensors: weights, value head and optimizer moments after it). The
single process takes that update on its live learner, so any loss in the round trip shows.

With --give-up, one iteration instead, which rank 0 is told to stop once its optimizer has taken
a step: every rank writes the weights it ends with (given-up-<rank>.safetensors) and rank 0 what
it was told (given-up.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf.auth import ClientSecurity
from rlhf.clients import GenerationClient
from rlhf.config import CommonConfig, load_config
from rlhf.models import TINY, load_base_policy, load_tokenizer
from rlhf.training import Interrupted, distributed
from rlhf.training.online import (
    LEARNER_FILE,
    OPTIMIZER_FILE,
    VALUE_HEAD_FILE,
    LoraSettings,
    PPOLearner,
    RolloutSettings,
)
from rlhf.training.pool import PoolSampler
from rlhf.training.ppo_config import PPOConfig
from services.trainer.ppo.lockstep import Lockstep, follow

BATCH = 8
GROUP = 2  # answers per prompt for grpo and rloo


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
    if learner.value_head is None:  # critic-free
        return weights
    value_head = learner.value_head.state_dict()
    return weights | {f"value_head.{k}": v.clone() for k, v in value_head.items()}


def full_trainable(learner: PPOLearner | Lockstep) -> dict[str, torch.Tensor]:
    """`trainable` for a learner that may be sharded: gathered through the collectives a
    checkpoint uses (every rank must call this together; the others get an empty dict)."""
    if not learner.world.sharded:
        return trainable(learner.learner if isinstance(learner, Lockstep) else learner)
    policy = learner.export_policy()
    tensors, _ = learner.state_files()
    if policy is None:
        return {}
    weights = {name: p.detach().clone() for name, p in policy.named_parameters()}
    value_head = tensors.get(VALUE_HEAD_FILE, {})  # none for grpo and rloo
    return weights | {f"value_head.{k}": v for k, v in value_head.items()}


def fixed_batch(eos: int) -> tuple[list[list[int]], list[float]]:
    # Responses of unequal lengths (the tiny model's samples all run to the token limit): each
    # rank's share of the batch's tokens differs, which the losses' normalisation must undo.
    responses = [[300 + row] * (1 + row) + [eos] for row in range(BATCH)]
    return responses, [float(row % 3) for row in range(BATCH)]


def make_learner(
    world: distributed.World,
    lora_rank: int,
    weights=None,
    pool: str = "",
    algorithm: str = "ppo",
    aggregation: str = "token",
) -> PPOLearner:
    """`pool`: host:port of a generation server serving these weights as v1, to sample on."""
    cache_dir = load_config(CommonConfig).cache_dir
    sampler = None
    if pool:
        # Rollouts need a service key: RLHF_CLIENT_KEY, as the trainer presents it.
        security = ClientSecurity.of(load_config(CommonConfig))
        client = GenerationClient(pool, timeout=60, security=security)
        sampler = PoolSampler(client, lambda: 1, max_policy_lag=0)
    return PPOLearner(
        weights or load_base_policy(TINY, cache_dir, seed=0),
        load_base_policy(TINY, cache_dir, seed=0),
        load_tokenizer(cache_dir),
        # One minibatch per epoch (the whole batch, every answer of every group): the step is
        # then exactly one process's.
        PPOConfig(
            ppo_epochs=2,
            minibatch_size=BATCH * GROUP,
            learning_rate=3e-3,
            init_kl_coef=0.2,
            algorithm=algorithm,
            group_size=GROUP,
            loss_aggregation=aggregation,
            # No ratio or value reaches its clip: a clip stops a token's gradient, so a ratio a
            # float rounding away from the bound (one process and two ranks sum gradients in
            # different orders) would send the two runs apart for good. Seen on an AVX2 CPU:
            # one GRPO token of 128 on each side of 1.2 in the second epoch, and the third
            # iteration's KL 0.137 against 0.051. The clip's own arithmetic is tested in
            # tests/unit (per token, with no reduction over ranks to tell apart).
            clip_range=1e3,
            clip_range_value=1e3,
            # float32: bfloat16 matmuls round differently with the batch's shape, so a rank's
            # shard would not compute bit-for-bit what one process computes on the whole batch.
            dtype="float32",
        ),
        RolloutSettings(max_new_tokens=8, seed=0),
        LoraSettings(rank=lora_rank),
        world,
        sampler=sampler,
    )


def with_moments(
    learner: PPOLearner | Lockstep, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    tensors, _ = learner.state_files()
    return weights | {f"optimizer.{k}": v for k, v in tensors[OPTIMIZER_FILE].items()}


def lockstep(learner: PPOLearner, world: distributed.World, run_lead):
    """One session of the trainer service's protocol: rank 0 runs `run_lead(lead)` through
    `Lockstep`, the other ranks follow its commands until it stops (returns rank 0's result)."""
    if not world.is_main:
        follow(learner, world, score)
        return None
    lead = Lockstep(learner, world)  # in a world of one, the learner itself
    try:
        return run_lead(lead)
    finally:
        lead.stop()


def update(learner: PPOLearner, world: distributed.World) -> dict[str, float]:
    """Every rank updates on its shard of the fixed batch, as a PPO iteration's update does
    (critic-free: rows in groups of GROUP answers to one prompt, never split over ranks)."""
    group = learner.config.answers_per_prompt
    rows = (
        [prompts()[row // group] for row in range(BATCH)],
        *fixed_batch(learner.tokenizer.eos_token_id),
    )
    return learner.update(*(world.shard(part) for part in rows))


def resume_and_update(args: argparse.Namespace, world: distributed.World) -> None:
    """Every rank: a fresh learner from the state rank 0 wrote, one more update, and rank 0
    writes what it ends with."""
    state_dir = args.out / "state"
    policy = load_base_policy(TINY, load_config(CommonConfig).cache_dir, seed=0)
    policy.load_state_dict(load_file(str(state_dir / "policy.safetensors")), strict=False)
    learner = make_learner(world, args.lora_rank, policy, "", args.algorithm, args.aggregation)
    tensors = {
        name: load_file(str(state_dir / name))
        for name in state_dir.glob("*.safetensors")
        for name in [name.name]
        if name != "policy.safetensors"
    }
    learner_json = json.loads((state_dir / LEARNER_FILE).read_text())
    learner.load_state(tensors, {LEARNER_FILE: learner_json})
    update(learner, world)
    # Gathered on every rank together (collectives); rank 0 holds the result.
    resumed = with_moments(learner, full_trainable(learner))
    if world.is_main:
        save_file(resumed, str(args.out / "resumed.safetensors"))


def give_up(args: argparse.Namespace, world: distributed.World, learner: PPOLearner) -> None:
    """One iteration that rank 0 gives up after the update's first minibatch step."""

    def iterate_until_stopped(lead: Lockstep | PPOLearner) -> str:
        try:
            lead.iterate(prompts(), score, stopping=lambda: bool(learner.optimizer.state))
        except Interrupted as exc:
            return str(exc)
        return ""

    told = lockstep(learner, world, iterate_until_stopped)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(trainable(learner), str(args.out / f"given-up-{world.rank}.safetensors"))
    if world.is_main:
        result = {"told": told, "updates": learner.updates}
        (args.out / "given-up.json").write_text(json.dumps(result))
    distributed.leave()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--strategy", choices=distributed.STRATEGIES, default="ddp")
    parser.add_argument("--pool", default="", help="host:port of a generation server")
    parser.add_argument("--algorithm", default="ppo")
    parser.add_argument("--aggregation", default="token")
    parser.add_argument("--give-up", action="store_true", help="see the module's docstring")
    args = parser.parse_args()

    torch.manual_seed(0)
    world = distributed.join(strategy=args.strategy)
    cache_dir = load_config(CommonConfig).cache_dir
    learner = make_learner(
        world,
        args.lora_rank,
        pool=args.pool,
        algorithm=args.algorithm,
        aggregation=args.aggregation,
    )
    initial = full_trainable(learner)  # every rank at once: no lead yet
    if args.give_up:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file(initial, str(args.out / "initial.safetensors"))
        give_up(args, world, learner)
        return
    fsdp = args.strategy == "fsdp"
    # In-process sampling is ddp's only: fsdp trains on rollouts sampled elsewhere.
    steps = 0 if fsdp and not args.pool else args.steps
    iterate_stats = lockstep(
        learner, world, lambda lead: [lead.iterate(prompts(), score) for _ in range(steps)]
    )
    for _ in range(2 if fsdp else 1):
        update(learner, world)
    # A rollback to the base weights: every rank must continue from rank 0's weights.
    lockstep(learner, world, lambda lead: lead.rebase(load_base_policy(TINY, cache_dir, seed=0)))
    stats = update(learner, world)
    trained = full_trainable(learner)  # every rank together

    def gather_state(lead: Lockstep) -> tuple:
        """The state a checkpoint holds, gathered to rank 0 through the trainer's protocol."""
        return lead.export_policy(), lead.state_files()

    state = lockstep(learner, world, gather_state) if fsdp else None
    if not world.is_main:
        if fsdp:
            world.barrier()  # rank 0 has written the state
            resume_and_update(args, world)
        distributed.leave()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if state is not None:
        state_dir = args.out / "state"
        state_dir.mkdir()
        policy, (tensors, json_files) = state
        save_file(
            # The head is tied to the embeddings: stored once, as the checkpoint store does.
            {k: v for k, v in policy.state_dict().items() if k != "lm_head.weight"},
            str(state_dir / "policy.safetensors"),
        )
        for name, content in tensors.items():
            save_file(content, str(state_dir / name))
        (state_dir / LEARNER_FILE).write_text(json.dumps(json_files[LEARNER_FILE]))
    save_file(initial, str(args.out / "initial.safetensors"))
    save_file(trained, str(args.out / "trained.safetensors"))
    stats["iterate"] = iterate_stats[-1] if iterate_stats else {}
    stats["kl_coef_after"] = learner.kl_controller.value
    stats["world_size"] = world.size
    (args.out / "stats.json").write_text(json.dumps(stats))
    if fsdp and world.distributed:
        world.barrier()
        resume_and_update(args, world)
    elif fsdp:  # the single process takes the same update on its live learner
        update(learner, world)
        save_file(with_moments(learner, trainable(learner)), str(args.out / "resumed.safetensors"))
    distributed.leave()


if __name__ == "__main__":
    main()
