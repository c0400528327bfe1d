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


def pick_tokens(
    logits: torch.Tensor, params: Sequence[Sampling], generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row of logits [B, V]; returns (tokens [B], logprobs [B]).

    Vectorised over the batch. Each row draws its uniform number from its own generator and
    samples by inverting its CDF, so a seeded row is reproducible whatever its batch-mates are.
    Logprobs are under the row's temperature, before top-k/top-p filtering (greedy rows: T=1).
    """
    temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    greedy = temperatures <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperatures), temperatures)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    # Each vocabulary-wide pass costs about a millisecond per step on SmolLM2's 49k tokens:
    # skip sampling when every row is greedy and the argmax when none is (PPO rollouts).
    if bool(greedy.all()):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = _sample(scaled, params, generators)
        if bool(greedy.any()):
            tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _sample(
    scaled: torch.Tensor, params: Sequence[Sampling], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row of temperature-scaled logits [B, V], by inverting each row's CDF."""
    filtered = scaled
    if any(p.top_k > 0 or 0.0 < p.top_p < 1.0 for p in params):
        filtered = torch.stack(
            [filter_logits(row, p.top_k, p.top_p) for row, p in zip(scaled, params, strict=True)]
        )
    cdf = torch.softmax(filtered, dim=-1).cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=g, dtype=cdf.dtype) for g in generators])
    # right=True skips zero-probability tokens even for a draw of exactly 0.
    sampled = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(1)
    return sampled.clamp(max=scaled.shape[-1] - 1)


# Called with (row, token, logprob) as each token is chosen: streaming and time-to-first-token.
OnToken = Callable[[int, int, float], None]


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: Sequence[Sampling],
    eos_ids: set[int],
    pad_id: int,
    stop_check: StopCheck | None = None,
    on_token: OnToken | None = None,
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
            logits_to_keep=1,  # the prefill needs only the last position's logits
        )
        tokens, logprobs = pick_tokens(out.logits[:, -1, :].float(), params, generators)
        token_list, logprob_list = tokens.tolist(), logprobs.tolist()  # one copy, not one per row
        next_ids = torch.full((len(prompts), 1), pad_id, dtype=torch.long)
        emitted = torch.zeros((len(prompts), 1), dtype=torch.long)
        for row, params_row in enumerate(params):
            if not active[row]:
                continue
            token, logprob = token_list[row], logprob_list[row]
            if on_token is not None:
                on_token(row, token, logprob)
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


def stop_sequence_check(
    decode: Callable[[list[int]], str], stops: Sequence[str]
) -> Callable[[list[int]], bool] | None:
    """A per-request check: did one of `stops` appear in the newest part of the text?"""
    if not stops:
        return None
    window = max(len(s) for s in stops) + 2  # a token spans at least one character

    def check(token_ids: list[int]) -> bool:
        tail = decode(token_ids[-window:])
        return any(s in tail for s in stops)

    return check


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop sequence (the stop sequence itself is not returned)."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


class IncrementalText:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.token_ids: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> str:
        self.token_ids.append(token)
        text = self._decode(self.token_ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        delta, self._emitted = text[len(self._emitted) :], text
        return delta
