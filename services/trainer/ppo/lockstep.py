"""The PPO stage across several data-parallel ranks: rank 0 leads, the others follow.

Rank 0 is the trainer service proper (Kafka intake, control plane, checkpoints). Every learner
call that takes a collective step goes through `Lockstep`, which first tells the followers
what to run; a follower (`follow`) runs the same call on its own learner and shard. The
followers therefore need no Kafka, no gRPC port and no write access to the store.

Under FSDP (`World.sharded`) reading the full weights or state is a collective too: rank 0's
`export_policy` and `state_files` (a checkpoint) are announced as well, and the followers take
their part in the gather and drop the result; only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import signal
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from rlhf.training import Interrupted, Stopping, never
from rlhf.training.distributed import ShardFailed, World
from rlhf.training.online import PPOLearner, Scorer

log = logging.getLogger(__name__)

ITERATE, REBASE, STOP = "iterate", "rebase", "stop"
EXPORT, STATE = "export_policy", "state_files"


class Lockstep:
    """Rank 0's learner: the learner's own interface, each step announced to the followers."""

    def __init__(self, learner: PPOLearner, world: World) -> None:
        self.learner = learner
        self.world = world

    def __getattr__(self, name: str) -> Any:  # updates, lora, world, ...
        return getattr(self.learner, name)

    def iterate(
        self,
        prompts: Sequence[Sequence[int]],
        score: Scorer,
        prompt_texts: Sequence[str] | None = None,
        stopping: Stopping = never,
    ) -> dict[str, float]:
        """Rank 0's `stopping` decides for every rank: the followers join its answer at each
        minibatch of the update (`ppo_step`) and give the update up with it."""
        self.world.broadcast((ITERATE, [list(p) for p in prompts], prompt_texts))
        return self.learner.iterate(prompts, score, prompt_texts, stopping)

    def export_policy(self) -> PreTrainedModel | None:
        if self.world.sharded:  # a gather every rank must join
            self.world.broadcast((EXPORT,))
        return self.learner.export_policy()

    def state_files(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        if self.world.sharded:
            self.world.broadcast((STATE,))
        return self.learner.state_files()

    def rebase(self, weights: torch.nn.Module) -> None:
        """A rollback: the followers rebase onto their own weights and the DDP wrapper built
        by the rebase copies rank 0's (the rolled-back ones) over them, parameters frozen or
        not, so no rank needs to read the store again. Sharded (fsdp), the rebase itself
        broadcasts rank 0's weights into every rank's slices."""
        self.world.broadcast((REBASE,))
        self.learner.rebase(weights)

    def stop(self) -> None:
        try:
            self.world.broadcast((STOP,))
        except RuntimeError as exc:  # a follower already gone (killed, or its pod evicted)
            log.warning("could not tell every rank to stop: %s", exc)


def follow(learner: PPOLearner, world: World, score: Scorer) -> None:
    """Run rank 0's commands on this rank's learner until it says stop.

    SIGTERM (torchrun forwards it to every rank) does not end a follower: rank 0 drains
    first, giving the update in flight up at its next minibatch (every rank at the same one),
    then says stop.
    """
    signal.signal(signal.SIGTERM, lambda *_: log.info("rank %d: waiting for rank 0", world.rank))
    while True:
        command, *args = world.broadcast()
        if command == STOP:
            return
        try:
            if command == ITERATE:
                prompts, prompt_texts = args
                learner.iterate(prompts, score, prompt_texts)
            elif command in (EXPORT, STATE):  # this rank's part of a gather to rank 0
                getattr(learner, command)()
            elif command == REBASE and world.sharded:
                learner.rebase(None)  # rank 0's weights arrive in the rebase's broadcast
            elif command == REBASE:
                # Any weights of the right shape do (rank 0's replace them), but fresh ones:
                # the old DDP wrapper's gradient hooks stay on the parameters it wrapped.
                weights = learner.export_policy()
                assert weights is not None  # not sharded: the rank's own policy
                learner.rebase(weights if learner.lora.enabled else copy.deepcopy(weights))
            else:
                raise ValueError(f"unknown command {command!r} from rank 0")
        except ShardFailed:
            log.warning("rank %d: another rank failed its share; step skipped", world.rank)
        except Interrupted as exc:
            log.info("rank %d: given up with rank 0 (%s)", world.rank, exc)
        except Exception:
            # Rank 0 logs and counts the same failure: a batch is dropped, training goes on.
            log.exception("rank %d: %s failed", world.rank, command)
