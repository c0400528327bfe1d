"""Batched sampling with a KV cache: the one decode loop used by serving and by PPO rollouts.

Prompts are left-padded so every row's next token sits in the last column; finished rows keep
stepping with a pad token and a zero attention mask. Each row samples with its own parameters and,
when a seed is given, its own `torch.Generator`, so a seeded request gives the same answer whatever
else is in the batch. The log-probability reported for a token is taken under the sampling
temperature and before top-k/top-p filtering: exactly what the PPO trainer recomputes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

EOS = "eos"
LENGTH = "length"
STOP = "stop"


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = LENGTH


# Called after each new token of a row with (row index, token ids so far); True stops the row.
StopCheck = Callable[[int, list[int]], bool]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k tokens and the top-p nucleus of a 1-D row."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; always keep the best one.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))


def _pick(logits: torch.Tensor, params: Sampling, generator: torch.Generator) -> tuple[int, float]:
    """Choose one token from a row of logits; returns (token, logprob under temperature)."""
    if params.temperature <= 0:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, dim=-1)[token])
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    filtered = filter_logits(scaled, params.top_k, params.top_p)
    probs = torch.softmax(filtered, dim=-1)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: Sequence[Sampling],
    eos_ids: set[int],
    pad_id: int,
    stop_check: StopCheck | None = None,
) -> list[Completion]:
    """Sample a completion for each prompt (rows may differ in every sampling parameter)."""
    if len(prompts) != len(params) or not prompts:
        raise ValueError("need one Sampling per prompt, and at least one prompt")
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
    input_ids, attention = left_pad(prompts, pad_id)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    generators = [_generator(p.seed) for p in params]
    completions = [Completion([], []) for _ in prompts]
    active = [p.max_new_tokens > 0 for p in params]
    cache = DynamicCache()
    step_ids, step_positions = input_ids, positions
    for _ in range(max(p.max_new_tokens for p in params)):
        if not any(active):
            break
        out = model(
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
        )
        last = out.logits[:, -1, :].float()
        next_ids = torch.full((len(prompts), 1), pad_id, dtype=torch.long)
        emitted = torch.zeros((len(prompts), 1), dtype=torch.long)
        for row, params_row in enumerate(params):
            if not active[row]:
                continue
            token, logprob = _pick(last[row], params_row, generators[row])
            completion = completions[row]
            completion.token_ids.append(token)
            completion.logprobs.append(logprob)
            next_ids[row, 0], emitted[row, 0] = token, 1
            if token in eos_ids:
                completion.finish_reason, active[row] = EOS, False
            elif stop_check is not None and stop_check(row, completion.token_ids):
                completion.finish_reason, active[row] = STOP, False
            elif len(completion.token_ids) >= params_row.max_new_tokens:
                completion.finish_reason, active[row] = LENGTH, False
        # Masks come from what was emitted, never from token identity: a sampled token that
        # happens to equal the pad id is still a real token.
        attention = torch.cat([attention, emitted], dim=1)
        step_positions = step_positions[:, -1:] + 1
        step_ids = next_ids
    return completions
