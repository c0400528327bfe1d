"""The PPO learner behind the online trainer: rollout, score, update, checkpoint contents.

It owns the trainable policy (optionally a LoRA adapter over frozen weights), its value head (ppo
only: grpo and rloo have none), the frozen reference and the optimizer. For grpo and rloo every
prompt is sampled `group_size` times (a group of consecutive rows, seeded by their place in the
global batch like every rollout) and scored like any other rollout. Scoring is injected (the
trainer service passes a reward-service client), and so is sampling on the generation pool
(`rlhf.training.pool`) when rollouts are not sampled in this process, so this file does no I/O.
`state_files` / `load_state` carry everything a resumed trainer needs beyond the policy weights:
value head, optimizer moments, KL controller, RNG states, counters and the algorithm.

Under FSDP (`World.sharded`) each rank holds a slice of the policy, value head and moments:
`export_policy`, `state_files` and `rebase` are then collectives that every rank calls together
(the trainer's ppo stage announces them to every rank), gathering to or broadcasting from rank
0. The files are the same as unsharded, so a checkpoint resumes under any strategy and world
size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import decoding
from rlhf.clients import Scores
from rlhf.config import ConfigError, SeedSettings, setting
from rlhf.models import packed_head, policy_in_dtype
from rlhf.training import Interrupted, Stopping, never
from rlhf.training.distributed import SINGLE, ShardFailed, World
from rlhf.training.pool import PoolRollouts, PoolSampler
from rlhf.training.ppo import (
    UpdateGivenUp,
    ValueHead,
    build_rollout,
    cast_frozen_linears,
    ppo_step,
)
from rlhf.training.ppo_config import PPOConfig
from rlhf.training.state import load_optimizer_state, optimizer_state

# (prompts, responses) -> one scalar per pair, with the reward model version that gave them
# (a plain list: version unknown, reported as 0)
Scorer = Callable[[list[str], list[str]], Scores | list[float]]

VALUE_HEAD_FILE = "value_head.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
ADAPTER_FILE = "adapter.safetensors"
LEARNER_FILE = "learner.json"


@dataclass(frozen=True)
class RolloutSettings(SeedSettings):
    max_new_tokens: int = setting("RLHF_PPO_RESPONSE_TOKENS", 48, "new tokens per rollout")

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("RLHF_PPO_RESPONSE_TOKENS must be positive")


@dataclass(frozen=True)
class LoraSettings:
    """rank 0 trains every weight; rank > 0 trains a LoRA adapter on these projections."""

    rank: int = setting(
        "RLHF_PPO_LORA_RANK", 0, "LoRA adapter rank for PPO (0 = train every weight)"
    )
    alpha: float = setting("RLHF_PPO_LORA_ALPHA", 16.0, "LoRA scaling numerator")
    target_modules: tuple[str, ...] = setting(
        "RLHF_PPO_LORA_TARGET_MODULES",
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "comma separated projections the LoRA adapter is put on",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError("RLHF_PPO_LORA_RANK must be >= 0")
        if self.enabled and not self.target_modules:
            raise ConfigError("RLHF_PPO_LORA_TARGET_MODULES must name at least one projection")


class PPOLearner:
    def __init__(
        self,
        policy: PreTrainedModel,
        reference: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: PPOConfig,
        rollout: RolloutSettings,
        lora: LoraSettings | None = None,
        world: World = SINGLE,
        sampler: PoolSampler | None = None,
    ) -> None:
        """`sampler`: rollouts on the generation pool, importance-weighted in the update
        (`ppo_step`); None samples them in this process, from the policy being trained."""
        self.reference = reference.eval().requires_grad_(False)
        if reference is not policy:  # its linear layers as autocast would cast them each pass
            device = next(reference.parameters()).device
            cast_frozen_linears(self.reference, config.compute_dtype(device))
        self.tokenizer = tokenizer
        self.config = config
        self.rollout_settings = rollout
        self.lora = lora or LoraSettings()
        if world.sharded and self.lora.enabled:
            # peft's merge for serving needs the whole weights in one module, and the adapter
            # is small enough that DDP suffices: sharding is for full fine-tuning only.
            raise ValueError("LoRA is not supported with the fsdp strategy; use ddp")
        self.world = world
        self.sampler = sampler
        # grpo and rloo have no critic: nothing to compute, train, shard or save for it.
        self.value_head: ValueHead | None = None
        self._trained_value_head: torch.nn.Module | None = None
        if not config.critic_free:
            self.value_head = ValueHead(policy.config.hidden_size).to(policy.device)
            self._trained_value_head = world.wrap(self.value_head)
        self.kl_controller = config.make_kl_controller()
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.updates = 0
        self._rollout_calls = 0
        # Why the weights and moments hold part of an update (given up on stop), or "".
        self._given_up = ""
        self._set_policy(policy)

    def _set_policy(self, weights: PreTrainedModel) -> None:
        """Train `weights` (or a fresh adapter over them) with a fresh optimizer."""
        if self.lora.enabled:
            adapter = LoraConfig(
                r=self.lora.rank,
                lora_alpha=self.lora.alpha,
                lora_dropout=0.0,
                target_modules=list(self.lora.target_modules),
                task_type="CAUSAL_LM",
            )
            self.policy = get_peft_model(weights, adapter)
        else:
            self.policy = weights
        # Sharding swaps the module's class for an FSDP subclass: an exported copy is built
        # as the plain class.
        self._policy_class = type(self.policy)
        # What the update trains through: a DistributedDataParallel wrapper when data parallel
        # (which also copies rank 0's weights to every rank here), the policy itself sharded
        # in place (fsdp), or the policy itself in a world of one. Wrapped before the
        # optimizer is built: sharding replaces the parameters with their slices.
        self._trained_policy = self.world.wrap(self.policy)
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # The parameter order (policy's trainable ones, then the value head's) is the index
        # the optimizer file is keyed by: the same under every strategy.
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        heads = [] if self.value_head is None else list(self.value_head.parameters())
        params = [*trainable, *heads]
        # Fused: one kernel over all parameters instead of a Python loop of elementwise passes
        # (measured 0.16 s instead of 0.67 s per step on SmolLM2's weights on this CPU).
        return torch.optim.AdamW(params, lr=self.config.learning_rate, fused=True)

    def rebase(self, weights: PreTrainedModel | None) -> None:
        """Continue training from other weights (a rollback): the value head and KL controller
        are kept, the optimizer moments (which belong to the old trajectory) start over.

        Sharded, a collective: rank 0's `weights` are broadcast into every rank's slices of
        the policy already sharded (the other ranks' argument is ignored and may be None).
        Refused while holding part of an update, on every rank before any collective: its
        process is stopping, and the value head would keep the part-update."""
        self._refuse_part_update()
        if not self.world.sharded:
            assert weights is not None
            self._set_policy(weights.to(self._device))
            return
        full = weights.state_dict() if self.world.is_main and weights is not None else {}
        set_model_state_dict(
            self.policy,
            full,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        self.optimizer = self._make_optimizer()

    @property
    def _device(self) -> torch.device:
        """Where this learner trains (the reference lives there too, whatever the strategy)."""
        return next(self.reference.parameters()).device

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.optimizer.param_groups[0]["params"])

    def export_policy(self) -> PreTrainedModel | None:
        """The policy as plain weights, for serving: a LoRA adapter is merged into a copy.

        Sharded, a collective: the full weights are gathered into a new unsharded model on
        rank 0 (on the CPU, one tensor at a time), the other ranks get None. Refused
        (`Interrupted`) while the weights hold part of an update given up on stop."""
        self._refuse_part_update()
        if self.world.sharded:
            full = _gather(self.policy)
            if not self.world.is_main:
                return None
            return _unsharded_copy(self._policy_class, self.policy.config, full)
        if not self.lora.enabled:
            return self.policy
        return copy.deepcopy(self.policy).merge_and_unload()

    def _refuse_part_update(self) -> None:
        if self._given_up:
            raise Interrupted(f"the policy holds part of an update ({self._given_up})")

    def sample(
        self, prompts: Sequence[Sequence[int]], first_row: int = 0, stopping: Stopping = never
    ) -> list[decoding.Completion]:
        """Rollouts from the current policy at the PPO temperature, with no top-k/top-p, so
        the logprobs recomputed in the update are the sampling distribution's own (in
        bfloat16, up to its rounding: `_rollouts` has the update weight that difference).

        Row i is seeded by its place in the global batch (`first_row` + i), so a rank's shard
        samples what one process would have sampled for those rows. `stopping` is asked
        between decoding steps in a world of one (`Interrupted`); ranks decode at their own
        pace (sharded, in step: a gather per layer), so they leave a stop to the update."""
        params = self._rollout_params(len(prompts), first_row)
        self.policy.eval()
        policy = self._decoding_policy()
        # Float32 decoding: the LM head in MKL's packed layout for the batch's rows (see
        # `packed_head`); sharded weights are not whole in this process, so they are not packed.
        rows = 0 if self.world.sharded else len(prompts)
        with packed_head(policy, rows):
            return decoding.generate(
                policy,
                prompts,
                params,
                {self.tokenizer.eos_token_id},
                self.tokenizer.pad_token_id,
                stopping=None if self.world.distributed else stopping,
            )

    def _decoding_policy(self) -> torch.nn.Module:
        """What in-process rollouts decode with: in bfloat16 (`PPOConfig.dtype`), a bfloat16
        copy of the current weights (a LoRA adapter merged in), built for this batch; else the
        policy itself. Measured on SmolLM2 on this CPU (AMX): 8 x 48 tokens decoded in 0.52x
        the float32 time on bfloat16 weights, plus 0.2 s to cast them; autocast over the float32
        weights was slower than float32 (it casts at every step). Sharded (fsdp), the policy
        decodes as it is: no rank holds the whole weights to copy."""
        if self._decoding_policy_is_exact():
            return self.policy
        dtype = self.config.compute_dtype(self._device)
        exported = self.export_policy()
        assert exported is not None  # not sharded
        # The rotary buffers of the copy are built on the CPU: moved with it (CUDA untested).
        return policy_in_dtype(exported, dtype).to(self._device)

    def _decoding_policy_is_exact(self) -> bool:
        """Whether in-process rollouts decode on the policy's own float32 weights."""
        return self.world.sharded or self.config.compute_dtype(self._device) == torch.float32

    def _rollout_params(self, count: int, first_row: int) -> list[decoding.Sampling]:
        """Sampling for one batch of rollouts, in process or on the pool alike."""
        self._rollout_calls += 1
        base_seed = self.rollout_settings.seed * 1_000_003 + self._rollout_calls * 1_009
        return [
            decoding.Sampling(
                max_new_tokens=self.rollout_settings.max_new_tokens,
                temperature=self.config.temperature,
                seed=base_seed + first_row + row,
            )
            for row in range(count)
        ]

    def _rollouts(
        self, prompts: Sequence[Sequence[int]], first_row: int, stopping: Stopping = never
    ) -> tuple[list[decoding.Completion], PoolRollouts | None]:
        """(completions, the batch with their behaviour logprobs if the update must weight
        them: sampled on the pool, or decoded here in bfloat16)."""
        if self.sampler is None:
            completions = self.sample(prompts, first_row, stopping)
            if self._decoding_policy_is_exact():
                return completions, None
            # Decoded on bfloat16 weights: not quite the distribution the update's passes
            # compute (SmolLM2: 0.03 nats per token apart on average, 0.3 at most), so the
            # update weights each token by pi_old / pi_decoded, as it does the pool's.
            return completions, PoolRollouts(
                completions, [self.updates] * len(completions), self.updates
            )
        pooled = self.sampler.sample(prompts, self._rollout_params(len(prompts), first_row))
        return pooled.completions, pooled

    def iterate(
        self,
        prompts: Sequence[Sequence[int]],
        score: Scorer,
        prompt_texts: Sequence[str] | None = None,
        stopping: Stopping = never,
    ) -> dict[str, float]:
        """One PPO iteration: sample, score, update. Returns TRL-style statistics.

        The reward model sees `prompt_texts` if given (the online trainer passes the user's
        words, as the reward model was trained on), else the decoded prompts. Data parallel,
        every rank is given the whole batch and works on its shard (whole prompts, so a group
        of answers never spans ranks); the statistics are the whole batch's. grpo and rloo
        sample `group_size` answers per prompt: rows p * G .. p * G + G - 1 answer prompt p.

        `stopping` gives the iteration up (`Interrupted`) between decoding steps (`sample`) and
        before each minibatch of the update (`ppo_step`; data parallel, rank 0's answer).
        """
        if prompt_texts is None:
            prompt_texts = self.tokenizer.batch_decode(prompts, skip_special_tokens=True)
        answers = self.config.answers_per_prompt
        # The global row of this rank's first rollout: rollouts are seeded by it.
        first_row = self.world.rank * (len(prompts) // self.world.size) * answers
        prompts = [p for p in self.world.shard(prompts) for _ in range(answers)]
        prompt_texts = [t for t in self.world.shard(prompt_texts) for _ in range(answers)]
        try:
            # Pool rollouts can fail on one rank only (stale pool, pool down): like scoring,
            # inside the agreement below, so that no rank enters the update's collectives alone.
            completions, pooled = self._rollouts(prompts, first_row, stopping)
            responses = [c.token_ids for c in completions]
            response_texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            scored = score(list(prompt_texts), response_texts)
        except Exception:
            self.world.any_rank(True)
            raise
        if self.world.any_rank(False):
            raise ShardFailed("another rank could not sample or score its share of the batch")
        if not isinstance(scored, Scores):
            scored = Scores(list(scored))
        stats = self.update(prompts, responses, scored.values, pooled, stopping)
        # The oldest reward model that scored any rank's share: what this update optimised.
        stats["reward/model_version"] = float(self._global_min(scored.model_version))
        return stats

    def _global_min(self, value: int) -> int:
        """The smallest of every rank's `value` (one collective: each rank fills its slot)."""
        if not self.world.distributed:
            return value
        slots = torch.zeros(self.world.size, device=self.world.device)
        slots[self.world.rank] = value
        return int(self.world.all_sum(slots).min().item())

    def update(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        scores: Sequence[float],
        pooled: PoolRollouts | None = None,
        stopping: Stopping = never,
    ) -> dict[str, float]:
        """One PPO update on scored responses (data parallel: this rank's shard of them);
        `pooled` is the batch they came from when the update weights them (the pool's, or
        decoded here in bfloat16), for the importance weights. For grpo and
        rloo the rows are whole groups, consecutive (see `iterate`). An update given up on
        stop after some of its minibatches leaves this learner refusing to export or go on:
        nothing of a part-update is to be published, and its process is on its way out."""
        self._refuse_part_update()
        off_policy: dict[str, Any] = {}
        if pooled is not None:
            off_policy = {
                "behaviour_logprobs": [c.logprobs for c in pooled.completions],
                "policy_versions": pooled.policy_versions,
                "latest_version": pooled.latest_version,
            }
        rollout = build_rollout(
            prompts,
            responses,
            scores,
            self.tokenizer.pad_token_id,
            self.tokenizer.eos_token_id,
            **off_policy,
            pad_to_multiple=self.config.width_multiple(self._device),
        )
        try:
            stats = ppo_step(
                self._trained_policy,
                self._trained_value_head,
                self.reference,
                self.optimizer,
                rollout,
                self.config,
                self.kl_controller,
                generator=self.shuffle,
                world=self.world,
                stopping=stopping,
            )
        except UpdateGivenUp as exc:
            if exc.steps:
                self._given_up = str(exc)
            raise
        self.updates += 1
        return stats

    def state_files(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """(tensors, json files) with the learner's state, for the checkpoint store.

        Sharded, a collective: the value head and moments are gathered whole to rank 0,
        whose files are those an unsharded learner writes (the other ranks' are partial
        and only good to discard). Refused while holding part of an update, as
        `export_policy` is."""
        self._refuse_part_update()
        opt_tensors, opt_meta = optimizer_state(self.optimizer, gather=_full_tensor)
        tensors = {
            OPTIMIZER_FILE: opt_tensors,
            RNG_FILE: {"shuffle": self.shuffle.get_state(), "torch": torch.get_rng_state()},
        }
        if self.value_head is not None:
            tensors[VALUE_HEAD_FILE] = (
                _gather(self.value_head)
                if self.world.sharded
                else dict(self.value_head.state_dict())
            )
        if self.lora.enabled:
            adapter = get_peft_model_state_dict(self.policy)
            tensors[ADAPTER_FILE] = {k: v.detach().clone() for k, v in adapter.items()}
        learner = {
            "updates": self.updates,
            "rollout_calls": self._rollout_calls,
            "kl_controller": self.kl_controller.state_dict(),
            "optimizer": opt_meta,
            "lora_rank": self.lora.rank,
            "algorithm": self.config.algorithm,
        }
        return tensors, {LEARNER_FILE: learner}

    def load_state(self, tensors: dict[str, dict[str, torch.Tensor]], json_files: dict) -> None:
        """Inverse of `state_files`; the policy must already hold the weights the state was
        saved with (with LoRA: the adapter's base weights; the adapter comes from here).

        Sharded, every rank passes the whole state (each reads the same checkpoint on resume)
        and keeps its slices of it: no communication, so not a collective."""
        learner = json_files[LEARNER_FILE]
        if learner["lora_rank"] != self.lora.rank:
            raise ValueError(
                f"trainer state was saved with LoRA rank {learner['lora_rank']}, "
                f"this trainer uses {self.lora.rank}"
            )
        if saved_algorithm(learner) != self.config.algorithm:
            # The optimizer's parameters differ (a value head or not) and so does what its
            # moments and the value head learnt from: not to be mixed.
            raise ValueError(
                f"trainer state was saved by {saved_algorithm(learner)}, "
                f"this trainer runs {self.config.algorithm}"
            )
        if self.lora.enabled:
            set_peft_model_state_dict(self.policy, tensors[ADAPTER_FILE])
        if self.value_head is not None:
            _load_full(self.value_head, tensors[VALUE_HEAD_FILE])
        params = self.optimizer.param_groups[0]["params"]
        moments = {
            name: _slice_like(params[int(name.split(".", 1)[0])], value)
            for name, value in tensors[OPTIMIZER_FILE].items()
        }
        load_optimizer_state(self.optimizer, moments, learner["optimizer"])
        # Copies: loaded tensors are views into the verified file's bytes, and a generator's
        # set_state reads a view from its storage's start, not the view's (torch 2.13).
        self.shuffle.set_state(tensors[RNG_FILE]["shuffle"].clone())
        torch.set_rng_state(tensors[RNG_FILE]["torch"].clone())
        self.kl_controller.load_state_dict(learner["kl_controller"])
        self.updates = int(learner["updates"])
        self._rollout_calls = int(learner["rollout_calls"])


def saved_algorithm(learner_json: dict[str, Any]) -> str:
    """The algorithm a learner state was saved by (states from before grpo and rloo existed
    are ppo's)."""
    return str(learner_json.get("algorithm", "ppo"))


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: a sharded one is all-gathered (a collective), others are as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _gather(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded module's full state dict on rank 0, on the CPU (empty on the other ranks):
    gathered one tensor at a time, so no rank ever holds a second whole copy on its device."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def _slice_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `full`, sharded as `param` is (`full` as is for an unsharded
    parameter, and for the scalars an optimizer keeps beside its moments, such as the step).
    Cut locally from the whole tensor every rank holds: no communication."""
    if not isinstance(param, DTensor) or full.shape != param.shape:
        return full
    return distribute_tensor(
        full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
    )


@torch.no_grad()
def _load_full(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state)` for a module that may be sharded: each parameter keeps
    its slice of the whole tensor in `state`."""
    params = dict(module.named_parameters())
    if set(params) != set(state):
        raise ValueError(f"state for {sorted(state)} does not fit parameters {sorted(params)}")
    for name, param in params.items():
        value = _slice_like(param, state[name])
        if isinstance(param, DTensor):
            param.to_local().copy_(value.to_local())
        else:
            param.copy_(value)


def _unsharded_copy(
    model_class: type[PreTrainedModel], config: Any, full: dict[str, torch.Tensor]
) -> PreTrainedModel:
    """A new plain `model_class` model holding the gathered weights `full`."""
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(full, strict=False, assign=True)
    if set(missing) - {"lm_head.weight"} or unexpected:  # lm_head: tied to the embeddings
        raise ValueError(f"gathered weights do not fit: missing {missing}, extra {unexpected}")
    model.tie_weights()
    # Buffers (rotary inverse frequencies) are not in the state dict: compute them for real.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config)
    return model.eval()
