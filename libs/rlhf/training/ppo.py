"""One PPO update on a batch of scored responses, built on `rlhf.algorithms.ppo`.

Read `ppo_step` top to bottom: the caller owns the models and the optimizer (policy + value head
parameters); the step scores the rollout under the current policy and the frozen reference
(`score_rollout`: old logprobs and values, per-token rewards with the KL penalty, advantages;
everything that stays fixed during the update, in a `ScoredRollout`), runs a few epochs of
clipped PPO over shuffled minibatches (`_train_epochs`) and returns TRL-style statistics. The
knobs are `rlhf.training.ppo_config.PPOConfig`.

The critic-free algorithms (`config.algorithm` grpo or rloo) are the same step without a value
head: the rollout holds groups of answers to the same prompts, and `score_rollout` takes the
advantages from each group (`rlhf.algorithms.group`) instead of GAE; there is no value loss.

Precision (`config.dtype`, RLHF_PPO_DTYPE): in bfloat16 the policy's and reference's forward
passes, and the backward through them, run under `torch.autocast` (`compute_precision`) over the
weights as they are (float32 masters for the policy); the logits come out in bfloat16 and are
cast to float32 before the log-softmax, so logprobs, ratios, KL, advantages, values and losses
are float32, and so are the gradients the optimizer sees. On the CPU attention runs in float32
inside those passes (`Float32Attention`), and the frozen reference stores its linear layers in
bfloat16 once (`cast_frozen_linears`: the numbers autocast would compute, without the casts).

A stop (`stopping`, rank 0's when data parallel) gives the update up before its next minibatch
(`UpdateGivenUp`): on a CPU an update can take a minute, and a stopping trainer publishes nothing
of it anyway. Every rank asks at the same points, so they all give up at the same minibatch.

Data parallel (a `World` of several ranks), each rank holds its shard of the batch; the few
places that must see the whole batch (advantage whitening, the losses' token normalisation, the
statistics) take a `world.all_sum`, and are marked so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from rlhf.algorithms import group as group_algo
from rlhf.algorithms import ppo as algo
from rlhf.models import round_up
from rlhf.training import Interrupted, Stopping, never
from rlhf.training.distributed import SINGLE, World
from rlhf.training.ppo_config import PPOConfig


class ValueHead(nn.Module):
    """A linear critic on the policy's last hidden state: [B, T, H] -> [B, T].

    Weight and bias start at 0, so every initial value is 0 and the untrained critic adds no
    noise to the first advantages.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The policy may run in bf16; the critic stays in its own (usually fp32) dtype.
        return self.linear(hidden_states.to(self.linear.weight.dtype)).squeeze(-1)


@dataclass
class Rollout:
    """A batch of prompts with sampled responses and their scores.

    input_ids [B, P+R] long: prompts left-padded to width P, responses right-padded to width R,
    so every response starts at column P. attention_mask [B, P+R] is 0 on the prompt's left
    pads and on response positions after the first EOS. `ended` [B] bool says whether each
    response finished by itself (EOS, or a stop string if the caller counts that as finished);
    it cannot be recovered from the ids without the EOS id, and `build_rollout` fills it in.

    Rollouts sampled by another process (the generation pool), or in this one on other weights
    than the update's (bfloat16 decoding, `PPOLearner`), also carry `behaviour_logprobs`
    [B, R], the logprobs each token was sampled with (0 on padding), `policy_versions` [B] long,
    the version that sampled each row, and `latest_version`, the trainer's latest published
    version when they were asked for; `ppo_step` then corrects for the difference between
    that behaviour policy and its own. Exact in-process rollouts leave them None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    scores: torch.Tensor
    ended: torch.Tensor
    behaviour_logprobs: torch.Tensor | None = None
    policy_versions: torch.Tensor | None = None
    latest_version: int = 0

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            prompt_width=self.prompt_width,
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
            scores=self.scores.to(device),
            ended=self.ended.to(device),
            behaviour_logprobs=None
            if self.behaviour_logprobs is None
            else self.behaviour_logprobs.to(device),
            policy_versions=None
            if self.policy_versions is None
            else self.policy_versions.to(device),
            latest_version=self.latest_version,
        )


def build_rollout(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    scores: Sequence[float],
    pad_id: int,
    eos_id: int,
    behaviour_logprobs: Sequence[Sequence[float]] | None = None,
    policy_versions: Sequence[int] | None = None,
    latest_version: int = 0,
    pad_to_multiple: int = 1,
) -> Rollout:
    """Pad token-id lists into a `Rollout`, its width (prompt plus response columns) rounded up
    to a multiple of `pad_to_multiple` with response padding (`PPOConfig.pad_multiple`).

    A response's real tokens are its own tokens up to and including its first EOS; lengths are
    known here, so a pad id the policy happened to sample mid-response still counts as real.
    `ended` is computed on the real tokens only, so a pad id equal to the EOS id is safe.
    Rollouts from another process give, per response, the logprob each token was sampled with
    and the policy version that sampled it (see `Rollout`), both or neither.
    """
    if not (len(prompts) == len(responses) == len(scores)) or not prompts:
        raise ValueError("need the same positive number of prompts, responses and scores")
    if (behaviour_logprobs is None) != (policy_versions is None):
        raise ValueError("give behaviour logprobs and policy versions together, or neither")
    if pad_to_multiple < 1:
        raise ValueError("pad_to_multiple must be >= 1")
    width_p = max(len(p) for p in prompts)
    width_r = max(max(len(r) for r in responses), 1)
    width_r = round_up(width_p + width_r, pad_to_multiple) - width_p
    prompt_ids = torch.tensor([[pad_id] * (width_p - len(p)) + list(p) for p in prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    response_ids = torch.tensor([list(r) + [pad_id] * (width_r - len(r)) for r in responses])
    lengths = torch.tensor([len(r) for r in responses])
    within_length = torch.arange(width_r).unsqueeze(0) < lengths.unsqueeze(1)
    # pad_id=-1 never matches a token: this only cuts after the first EOS.
    mask = within_length & algo.response_mask(response_ids, eos_id, pad_id=-1)
    behaviour = versions = None
    if behaviour_logprobs is not None and policy_versions is not None:
        lengths_fit = [len(b) for b in behaviour_logprobs] == [len(r) for r in responses]
        if not lengths_fit or len(policy_versions) != len(responses):
            raise ValueError("need one behaviour logprob per response token, one version per row")
        behaviour = torch.tensor(
            [list(b) + [0.0] * (width_r - len(b)) for b in behaviour_logprobs], dtype=torch.float32
        )
        versions = torch.tensor(list(policy_versions), dtype=torch.long)
    return Rollout(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1).long(),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        prompt_width=width_p,
        response_ids=response_ids.long(),
        response_mask=mask,
        scores=torch.tensor(scores, dtype=torch.float32),
        ended=((response_ids == eos_id) & mask).any(dim=-1),
        behaviour_logprobs=behaviour,
        policy_versions=versions,
        latest_version=latest_version,
    )


def compute_precision(dtype: torch.dtype, device: torch.device) -> AbstractContextManager:
    """Where a model's passes run in `dtype`: autocast to it (matmuls in `dtype`, weights kept
    as they are; the backward follows the forward's casts), or nothing for float32.

    On the CPU, attention stays in float32 all the same (`Float32Attention`): its FLOPs are
    few at these lengths, and the CPU's bfloat16 flash-attention backward is slow. Measured on
    SmolLM2, 4 x 90 tokens forward and backward: 0.93 s instead of 1.04 s; a no-grad pass of 8
    rows 0.44 s instead of 0.42 s. (SDPA's math backend in bfloat16, also faster, moved a
    bfloat16 step's update away from the float32 step's, to a cosine of 0.987 on the tiny
    model: not taken.)

    Nested uses share one autocast cache: while the outermost context is open, a weight that
    requires grad is cast once and the cast serves every pass inside it."""
    if dtype == torch.float32:
        return nullcontext()
    stack = ExitStack()
    # CUDA: untested here (no GPU on this machine); its flash kernels run in `dtype`.
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if device.type == "cpu":
        stack.enter_context(Float32Attention())
    return stack


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store a frozen model's linear layers (weights and biases) in `dtype`, once, in place.

    Under `compute_precision(dtype)` autocast casts every linear layer's parameters to `dtype`
    at every pass anyway (it keeps casts across passes only of parameters that require grad),
    so the passes compute the same numbers, bit for bit, without casting 135M weights each
    time (SmolLM2's reference pass over 8 rows: 0.34 s instead of 0.43 s). Embeddings and
    norms keep their float32 weights, as autocast runs them in float32; a tied output head
    becomes a bfloat16 copy beside the float32 embedding. For the reference only: a model
    with trainable parameters is refused."""
    if dtype == torch.float32:
        return model
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("only a frozen model's linear layers can be stored in a lower precision")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
    return model


class Float32Attention(TorchFunctionMode):
    """Inside it, `scaled_dot_product_attention` computes in float32 (autocast off, query,
    key, value and a floating mask cast up; autograd casts the gradients back), and returns
    float32: the output projection's autocast casts it down again. Everything else runs as
    called."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        up = [_float32(a) for a in args]
        if "attn_mask" in kwargs:
            kwargs["attn_mask"] = _float32(kwargs["attn_mask"])
        with torch.autocast(up[0].device.type, enabled=False):
            return func(*up, **kwargs)


def _float32(value: object) -> object:
    """A floating tensor in float32; anything else (a boolean mask, a number) as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def forward_policy(
    model: nn.Module,
    value_head: ValueHead | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
    with_entropy: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One forward pass: per response token (logprobs [B, R], values [B, R] | None, entropy
    [B, R] | None if not `with_entropy`), all float32.

    The model runs in `dtype` (`compute_precision`); everything after it does not: the logits
    are cast to float32 before the log-softmax, and the value head reads the last hidden state
    cast to its own (float32) weights' dtype.

    Position ids count only attended tokens (cumsum(mask) - 1, clamped at 0 on the pads): with
    left padding, the default 0..T-1 would shift every real token by the pad count and change
    the logits. The logits at columns P-1 .. P+R-2 predict the response tokens at P .. P+R-1,
    and the value at the same column is that of the state before the token is chosen. Logits
    are divided by the sampling temperature, for the log-probabilities and the entropy alike.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    width = input_ids.shape[1]
    with compute_precision(dtype, input_ids.device):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=value_head is not None,
            use_cache=False,
            # Only the last R+1 columns go through the LM head (a vocab x hidden matmul per
            # column): the prompt's other columns predict nothing we score, and the head is ~20%
            # of the model's FLOPs on SmolLM2. The last column is dropped below.
            logits_to_keep=width - prompt_width + 1,
        )
    logits = out.logits[:, :-1]
    states = slice(prompt_width - 1, width - 1)
    response_ids = input_ids[:, prompt_width:]
    # float32 from here on, even when the caller holds a precision context open around several
    # passes (`_old_policy_pass`): autocast would run the value head in `dtype`.
    with torch.autocast(input_ids.device.type, enabled=False):
        logprobs = algo.logprobs_from_logits(logits, response_ids, temperature)
        entropy = None
        if with_entropy:
            with torch.no_grad():  # a statistic only: never part of a loss
                entropy = algo.entropy_from_logits(logits.float() / temperature)
        values = None if value_head is None else value_head(out.hidden_states[-1][:, states])
    return logprobs, values, entropy


@contextmanager
def _eval_mode(*maybe_modules: nn.Module | None) -> Iterator[None]:
    """Disable dropout for the duration: with dropout on, the ratio to the old policy would be
    noisy even before any update, and the KL to the reference would never start at 0."""
    modules = [m for m in maybe_modules if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was_training, strict=True):
            m.train(training)


class UpdateGivenUp(Interrupted):
    """An update given up on stop before one of its minibatches. `steps` optimizer steps of it
    were taken: if any, the policy and the optimizer hold part of an update, which must not be
    published (`PPOLearner` refuses to export them)."""

    def __init__(self, steps: int, total: int) -> None:
        super().__init__(f"update given up on stop after {steps} of {total} minibatch steps")
        self.steps = steps


@dataclass
class ScoredRollout:
    """Everything that stays fixed during one update, per response token [B, R] unless noted:
    the policy's logprobs and values before the update, the entropy (a statistic), the scores
    [B] after the no-EOS penalty, the per-token KL to the reference, the advantages and the
    returns the value head regresses on (values and returns None without a value head: grpo,
    rloo); for off-policy rollouts, the truncated importance weights of each token and the
    share of real tokens whose weight the cap cut (None for on-policy rollouts)."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor | None
    entropy: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    is_weights: torch.Tensor | None = None
    is_capped_frac: torch.Tensor | None = None


# The policy's (logprobs, values) for some rows, still attached to the autograd graph (values
# None without a value head).
TrackedForward = tuple[torch.Tensor, torch.Tensor | None]


def ppo_step(
    policy: nn.Module,
    value_head: ValueHead | None,
    reference: nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    config: PPOConfig,
    kl_controller: algo.KLController,
    generator: torch.Generator | None = None,
    world: World = SINGLE,
    stopping: Stopping = never,
) -> dict[str, float]:
    """One PPO update of `policy` and `value_head` on `rollout`; returns float statistics.

    The optimizer must cover the policy and value head parameters. `generator` (CPU) shuffles
    the minibatches; pass a long-lived one so successive steps shuffle differently, or leave it
    None for a fresh one seeded with `config.seed`. The KL controller is updated at the end,
    with the mean per-sequence KL; "objective/kl_coef" is the coefficient this step used.

    Data parallel (`world` of several ranks): `rollout` is this rank's shard, `policy` and
    `value_head` are wrapped in DistributedDataParallel, and `config.minibatch_size` is the
    global minibatch (each rank trains on its share of it). Whitening, the losses' token
    normalisation, the KL controller's input and the statistics are over the whole batch, so
    every rank takes the same step a single process would take on the whole batch (exactly,
    when one minibatch covers the batch; otherwise the shuffle is drawn within each shard).

    Rollouts with behaviour logprobs (sampled by another policy version, see `Rollout`) weight
    each token's clipped surrogate by min(pi_old / pi_behaviour, `config.importance_cap`),
    pi_old being this policy before the update; the value loss, the KL penalty and the
    advantages are computed as for on-policy rollouts.

    grpo and rloo (`config.critic_free`) take no value head (pass None): the rollout's rows are
    groups of `config.group_size` answers to one prompt each, consecutive, never split across
    ranks, and each row's advantage is its KL-penalised return against its group's
    (`rlhf.algorithms.group`). They report TRL GRPOTrainer's "reward_std" and
    "frac_reward_zero_std" and no value statistics.

    `stopping` is asked before every minibatch; True raises `UpdateGivenUp` there. Data
    parallel, the answer is rank 0's (the other ranks pass `never`): each rank asks at the same
    minibatch and they agree with one collective, so no rank is left alone in a gradient's.
    """
    if config.critic_free != (value_head is None):
        raise ValueError(
            f"{config.algorithm} needs {'no' if config.critic_free else 'a'} value head"
        )
    device = next(policy.parameters()).device
    rollout = rollout.to(device)
    kl_coef = kl_controller.value
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    size = rollout.input_ids.shape[0]
    minibatch_size = _local_minibatch_size(config.minibatch_size, world)
    # Every epoch's shuffle is drawn up front (same draws, same order as one per epoch): the
    # scoring pass needs to know which rows the first minibatch will train on.
    orders = [
        torch.randperm(size, generator=generator).to(device) for _ in range(config.ppo_epochs)
    ]
    first_rows = orders[0][:minibatch_size] if orders else None

    with _eval_mode(policy, value_head, reference):
        scored, first_forward = score_rollout(
            policy, value_head, reference, rollout, config, kl_coef, first_rows, world
        )
        loss_stats = _train_epochs(
            policy,
            value_head,
            optimizer,
            rollout,
            scored,
            config,
            orders,
            first_forward,
            world,
            minibatch_size,
            stopping,
        )

    mask = rollout.response_mask.bool()
    seq_kl = _global_mean(scored.kl.sum(-1), world)
    kl_controller.update(seq_kl, n_steps=_global_rows(size, world, device))
    entropy = world.all_sum(torch.stack([scored.entropy[mask].sum(), mask.sum().float()]))
    group_stats: dict[str, float] = {}
    if config.critic_free:  # over the scores after the no-EOS penalty, as TRL's over rewards
        raw = group_algo.group_reward_stats(scored.scores, config.group_size, world.all_sum)
        group_stats = {name: value.item() for name, value in raw.items()}
    return {
        "objective/kl": seq_kl,
        "objective/kl_coef": kl_coef,
        "objective/rlhf_reward": _global_mean(scored.scores - kl_coef * scored.kl.sum(-1), world),
        "objective/scores": _global_mean(scored.scores, world),
        "policy/entropy": (entropy[0] / entropy[1].clamp(min=1.0)).item(),
        **loss_stats,
        "response/length": _global_mean(mask.float().sum(-1), world),
        "response/ended_frac": _global_mean(rollout.ended.float(), world),
        **group_stats,
        **_off_policy_stats(rollout, scored, world),
    }


def score_rollout(
    policy: nn.Module,
    value_head: ValueHead | None,
    reference: nn.Module,
    rollout: Rollout,
    config: PPOConfig,
    kl_coef: float,
    tracked_rows: torch.Tensor | None = None,
    world: World = SINGLE,
) -> tuple[ScoredRollout, TrackedForward | None]:
    """Everything fixed during the update: old logprobs and values, rewards, advantages (GAE
    with a value head; from each group's returns without one, `config.critic_free`).

    The policy's pass over `tracked_rows` keeps its autograd graph and is returned too: before
    any update it is exactly what the first minibatch of the first epoch (those rows) would
    compute again, one forward pass of a minibatch per step.
    """
    mask = rollout.response_mask.bool()
    dtype = config.compute_dtype(rollout.input_ids.device)
    old_logprobs, old_values, entropy, tracked = _old_policy_pass(
        policy, value_head, rollout, config.temperature, tracked_rows, dtype
    )
    with torch.no_grad():
        ref_logprobs, _, _ = forward_policy(
            reference,
            None,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.prompt_width,
            config.temperature,
            with_entropy=False,
            dtype=dtype,
        )
        # The scores are what the step optimises, so statistics report them after the penalty.
        scores = algo.apply_no_eos_penalty(
            rollout.scores.float(), rollout.ended, config.no_eos_penalty
        )
        rewards, kl = algo.compute_rewards(
            scores, old_logprobs, ref_logprobs, mask, kl_coef, config.kl_estimator
        )
        if old_values is None:  # critic-free: this rank's rows are whole groups
            advantages, returns = _group_advantages(rewards, mask, config), None
        else:
            advantages, returns = algo.gae(old_values, rewards, mask, config.gamma, config.lam)
            if config.whiten_advantages:  # over every rank's tokens
                advantages = algo.masked_whiten(advantages, mask, all_sum=world.all_sum)
        is_weights = capped_frac = None
        if rollout.behaviour_logprobs is not None:  # sampled by another policy version
            is_weights, is_stats = algo.truncated_importance_weights(
                old_logprobs, rollout.behaviour_logprobs, mask, config.importance_cap
            )
            capped_frac = is_stats["capped_frac"]
    scored = ScoredRollout(
        old_logprobs=old_logprobs,
        old_values=old_values,
        entropy=entropy,
        scores=scores,
        kl=kl,
        advantages=advantages,
        returns=returns,
        is_weights=is_weights,
        is_capped_frac=capped_frac,
    )
    return scored, tracked


def _group_advantages(rewards: torch.Tensor, mask: torch.Tensor, config: PPOConfig) -> torch.Tensor:
    """Per-token advantages [B, R] of grpo or rloo: each answer's KL-penalised return against
    its group's, spread over its real tokens (`rlhf.algorithms.group` for the choices)."""
    returns = group_algo.sequence_returns(rewards, mask)
    if config.algorithm == "rloo":
        advantages = group_algo.rloo_advantages(returns, config.group_size)
    elif config.algorithm == "grpo":
        advantages = group_algo.grpo_advantages(returns, config.group_size, config.grpo_scale_std)
    else:
        raise ValueError(f"{config.algorithm!r} does not take its advantages from groups")
    return group_algo.token_advantages(advantages, mask)


def _train_epochs(
    policy: nn.Module,
    value_head: ValueHead | None,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    scored: ScoredRollout,
    config: PPOConfig,
    orders: list[torch.Tensor],
    first_forward: TrackedForward | None,
    world: World,
    minibatch_size: int,
    stopping: Stopping = never,
) -> dict[str, float]:
    """One pass over shuffled minibatches of `minibatch_size` rows (this rank's) per order in
    `orders` (one per epoch); returns the loss statistics averaged over all minibatches (of
    this rank). `first_forward` stands in for the first minibatch's forward pass; `stopping`
    (agreed over the ranks) gives the rest up before any minibatch."""
    heads = [] if value_head is None else list(value_head.parameters())
    params = [p for p in [*policy.parameters(), *heads] if p.requires_grad]
    size = rollout.input_ids.shape[0]
    totals: dict[str, float] = {}
    n_minibatches = 0
    total = len(orders) * math.ceil(size / minibatch_size)
    for order in orders:
        for start in range(0, size, minibatch_size):
            if world.any_rank(stopping()):
                raise UpdateGivenUp(n_minibatches, total)
            rows = order[start : start + minibatch_size]
            forward = first_forward if n_minibatches == 0 else None
            pg_loss, vf_loss, stats = _minibatch_loss(
                policy, value_head, rollout, scored, rows, config, forward
            )
            mask = rollout.response_mask[rows]
            if world.distributed:  # each loss scaled by this rank's share of what it averages
                pg_loss = pg_loss * _loss_share(mask, config.loss_aggregation, world)
                if vf_loss is not None:
                    vf_loss = vf_loss * _loss_share(mask, "token", world)
            loss = pg_loss if vf_loss is None else pg_loss + config.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            n_minibatches += 1
    return {key: total / max(n_minibatches, 1) for key, total in totals.items()}


def _minibatch_loss(
    policy: nn.Module,
    value_head: ValueHead | None,
    rollout: Rollout,
    scored: ScoredRollout,
    rows: torch.Tensor,
    config: PPOConfig,
    forward: TrackedForward | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """(clipped policy loss, clipped value loss or None without a value head, statistics) on
    `rows`; `forward` is their (logprobs, values) if already computed with autograd on."""
    mask = rollout.response_mask.bool()[rows]
    if forward is None:
        logprobs, values, _ = forward_policy(
            policy,
            value_head,
            rollout.input_ids[rows],
            rollout.attention_mask[rows],
            rollout.prompt_width,
            config.temperature,
            with_entropy=False,  # reported from the scoring pass; here it would only cost time
            dtype=config.compute_dtype(rollout.input_ids.device),
        )
    else:
        logprobs, values = forward
    pg_loss, pg_stats = algo.policy_loss(
        logprobs,
        scored.old_logprobs[rows],
        scored.advantages[rows],
        mask,
        config.clip_range,
        weights=None if scored.is_weights is None else scored.is_weights[rows],
        aggregation=config.loss_aggregation,  # type: ignore[arg-type]  # validated setting
    )
    stats = {
        "policy/clipfrac": pg_stats["clipfrac"].item(),
        "policy/approxkl": pg_stats["approx_kl"].item(),
        "val/ratio": pg_stats["ratio"].item(),
        "loss/policy": pg_loss.item(),
    }
    if values is None:  # critic-free
        return pg_loss, None, stats
    assert scored.old_values is not None and scored.returns is not None
    vf_loss, vf_clipfrac = algo.value_loss(
        values, scored.old_values[rows], scored.returns[rows], mask, config.clip_range_value
    )
    stats |= {"val/clipfrac": vf_clipfrac.item(), "loss/value": vf_loss.item()}
    return pg_loss, vf_loss, stats


# --------------------------------------------------------------------------------------------
# The scoring pass's forwards
# --------------------------------------------------------------------------------------------


def _old_policy_pass(
    policy: nn.Module,
    value_head: ValueHead | None,
    rollout: Rollout,
    temperature: float,
    tracked_rows: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, TrackedForward | None]:
    """(old logprobs, old values (None without a value head), entropy) for every row,
    detached, and the tracked forward of `tracked_rows` (None if not asked for): one pass over
    those rows with autograd on, one without over the others; the model runs in `dtype`."""
    args = (rollout.prompt_width, temperature, True, dtype)
    ids, attention = rollout.input_ids, rollout.attention_mask
    if tracked_rows is None:
        with torch.no_grad():
            logprobs, values, entropy = forward_policy(policy, value_head, ids, attention, *args)
        assert entropy is not None
        return logprobs, values, entropy, None
    rest = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    rest[tracked_rows] = False
    # One precision context around both passes: in bfloat16, the weights autocast casts for
    # the tracked pass are cached and serve the other rows' pass (SmolLM2: the two passes in
    # 0.49 s instead of 0.64 s).
    with compute_precision(dtype, ids.device):
        with torch.enable_grad():
            tracked = forward_policy(
                policy, value_head, ids[tracked_rows], attention[tracked_rows], *args
            )
        parts = [(tracked_rows, tracked)]
        if bool(rest.any()):
            with torch.no_grad():
                parts.append(
                    (rest, forward_policy(policy, value_head, ids[rest], attention[rest], *args))
                )
    merged: list[torch.Tensor | None] = []
    for field in range(3):  # logprobs, values, entropy
        if tracked[field] is None:  # no value head
            merged.append(None)
            continue
        out = torch.empty(rollout.response_mask.shape, dtype=torch.float32, device=ids.device)
        for rows, outputs in parts:
            out[rows] = outputs[field].detach().float()
        merged.append(out)
    logprobs, values, entropy = merged
    assert logprobs is not None and entropy is not None
    return logprobs, values, entropy, (tracked[0], tracked[1])


# --------------------------------------------------------------------------------------------
# Data parallel: what makes N ranks' step the one a single process takes on the whole batch
# --------------------------------------------------------------------------------------------


def _local_minibatch_size(minibatch_size: int, world: World) -> int:
    if minibatch_size % world.size:
        raise ValueError(
            f"a minibatch of {minibatch_size} does not split evenly over {world.size} ranks"
        )
    return minibatch_size // world.size


def _loss_share(mask: torch.Tensor, aggregation: str, world: World) -> torch.Tensor:
    """Turns this rank's mean loss into its share of the global minibatch's mean.

    A loss averages over the rank's real tokens ("token") or its answers that have any
    ("sequence"), and DDP averages gradients over ranks: a mean of means, which weighs a token
    of a rank with short responses more. Scaling by local_count * ranks / global_count makes
    the averaged gradient that of the global mean, the one a single process on the whole
    minibatch computes.
    """
    counted = mask.bool() if aggregation == "token" else mask.bool().any(dim=-1)
    local = counted.sum().float()
    return local * world.size / world.all_sum(local).clamp(min=1.0)


def _global_mean(per_row: torch.Tensor, world: World) -> float:
    """The mean over every rank's rows of a per-row statistic."""
    rows = torch.tensor(float(per_row.shape[0]), device=per_row.device)
    totals = world.all_sum(torch.stack([per_row.float().sum(), rows]))
    return (totals[0] / totals[1]).item()


def _global_rows(size: int, world: World, device: torch.device) -> int:
    return int(world.all_sum(torch.tensor(size, device=device)).item())


def _off_policy_stats(rollout: Rollout, scored: ScoredRollout, world: World) -> dict[str, float]:
    """The importance weights' statistics over every rank's tokens: the mean weight, the share
    of tokens the cap cut, and the largest policy lag (versions behind `latest_version`) of
    any row. On-policy rollouts report 1, 0 and 0, so the statistics always exist."""
    weights, capped_frac = scored.is_weights, scored.is_capped_frac
    if weights is None or capped_frac is None or rollout.policy_versions is None:
        return {
            "policy/is_weight_mean": 1.0,
            "policy/is_capped_frac": 0.0,
            "rollout/policy_lag_max": 0.0,
        }
    tokens = rollout.response_mask.bool().sum().float()
    totals = world.all_sum(torch.stack([weights.sum(), capped_frac * tokens, tokens]))
    # A max over ranks from the one collective there is: each rank fills its own slot.
    lags = torch.zeros(world.size, device=weights.device)
    lags[world.rank] = (rollout.latest_version - rollout.policy_versions).clamp(min=0).max().float()
    return {
        "policy/is_weight_mean": (totals[0] / totals[2].clamp(min=1.0)).item(),
        "policy/is_capped_frac": (totals[1] / totals[2].clamp(min=1.0)).item(),
        "rollout/policy_lag_max": world.all_sum(lags).max().item(),
    }
