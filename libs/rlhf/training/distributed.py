"""Data parallelism on torch.distributed, for processes started by `torchrun`.

One code path for every size: a `World` of one (a plain `python -m services.trainer`) does no
communication at all, and torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR)
turns the same code into data-parallel training: gloo on CPU, NCCL on GPU. Each rank takes its
contiguous share of every batch (`World.shard`), gradients are averaged by
DistributedDataParallel, and the few statistics that must be global (advantage whitening, token
counts, the KL fed to the controller) are summed with `World.all_sum`.

Strategy fsdp (for models whose weights, gradients and optimizer moments do not fit one device)
shards the trained modules with FSDP2 (`fully_shard`) instead: each rank keeps 1/N of every
parameter, its gradient and its moments; gradients are averaged over the ranks like DDP's.
Anything that needs the full weights (a checkpoint, a rollback) is then a collective.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")

BACKENDS = ("gloo", "nccl")
STRATEGIES = ("ddp", "fsdp")
# A rank waits this long for the others at a collective before failing: long enough for rank 0
# to load a checkpoint or wait for a batch of feedback, short enough to surface a dead peer.
DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        """Whether trained modules are sharded over the ranks (fsdp): reading or replacing
        their full weights is then a collective every rank must enter together."""
        return self.distributed and self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reads feedback, serves the control plane and writes
        checkpoints (written once, by it alone)."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank computes: its own GPU when there are GPUs, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch. Every rank must get as many rows as
        the others (a rank with fewer minibatches would wait for ever at the next all-reduce),
        so the batch must divide evenly."""
        if len(items) % self.size:
            raise ValueError(
                f"a batch of {len(items)} does not split evenly over {self.size} ranks"
            )
        share = len(items) // self.size
        return list(items[self.rank * share : (self.rank + 1) * share])

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every rank (a new tensor; the input is left alone)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (the others' argument is ignored). Pickled by
        torch.distributed between this job's own ranks only, never read from storage.

        It travels on a CPU (gloo) group of its own whose timeout is unbounded: the other
        ranks wait here for rank 0's next command for as long as no feedback arrives, which
        must not trip the training collectives' timeout."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=_command_group())
        return box[0]

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (a collective: every rank asks at the same
        point). Ranks agree with it before a collective step that one of them would not join:
        a rank that failed its share, or rank 0 told to stop."""
        return bool(self.all_sum(torch.tensor(int(flag), device=self.device)).item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` as DistributedDataParallel (gradients averaged over the ranks during
        backward, rank 0's weights copied to every rank now), sharded in place (fsdp, see
        `shard_module`), or as is in a world of one."""
        if not self.distributed:
            return module
        if self.sharded:
            return self.shard_module(module)
        device_ids = [self.local_rank] if next(module.parameters()).is_cuda else None
        # Buffers (rotary tables) are never trained: broadcasting them every forward is waste.
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def shard_module(self, module: nn.Module) -> nn.Module:
        """`module` sharded in place with FSDP2 and returned: each decoder layer is a unit of
        its own (all-gathered just before it runs and freed after, so only one layer is whole
        at a time), the root holds the rest (embeddings, final norm, head).

        Every rank must pass the same weights: unlike DDP, sharding copies nothing from rank
        0, each rank keeps its slice of what it was given (the trainer loads the same
        checkpoint on every rank; a rollback broadcasts rank 0's, see `PPOLearner.rebase`).
        Gradients are reduce-scattered and divided by the world size, DDP's average, so the
        losses' normalisation (`ppo._loss_share`) holds for both strategies."""
        layers = getattr(getattr(module, "model", None), "layers", None)
        for layer in layers if isinstance(layers, nn.ModuleList) else ():
            fully_shard(layer)
        # Explicitly True: by default the root stays unsharded from forward to backward, and
        # its `parameters()` are then the whole tensors, not the sharded ones the optimizer
        # and gradients live on; the update lists them after the scoring forward, so gradient
        # clipping would leave out the root's gradients (and the value head's, a root too).
        fully_shard(module, reshard_after_forward=True)
        return module


SINGLE = World()
# Commands wait for feedback, which may not come for days.
_COMMAND_TIMEOUT = timedelta(days=365)
_commands: dist.ProcessGroup | None = None


def _command_group() -> dist.ProcessGroup:
    global _commands
    if _commands is None:
        _commands = dist.new_group(backend="gloo", timeout=_COMMAND_TIMEOUT)
    return _commands


class ShardFailed(RuntimeError):
    """Another rank could not do its part of a step (its reward call failed, say): every rank
    skips the step, so none waits for ever in a collective the others never enter."""


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not started by torchrun)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def join(backend: str = "", timeout: timedelta = DEFAULT_TIMEOUT, strategy: str = "ddp") -> World:
    """The world torchrun describes in the environment, joining its process group; a world of
    one (no process group) when the process was not started by torchrun. `strategy` (ddp or
    fsdp) is how `World.wrap` spreads a trained module over the ranks."""
    if strategy not in STRATEGIES:
        raise ValueError(f"data-parallel strategy {strategy!r}: expected one of {STRATEGIES}")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(strategy=strategy)
    world = World(
        rank=int(os.environ["RANK"]),
        size=size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        strategy=strategy,
    )
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend {backend!r}: expected one of {BACKENDS}")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, timeout=timeout)
        _command_group()  # a collective: created by every rank at the same point
    return world


def leave() -> None:
    """Leave the process group, if this process joined one."""
    global _commands
    if dist.is_initialized():
        dist.destroy_process_group()
    _commands = None
