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
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from rlhf import models
from rlhf.training import Interrupted, Stopping

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


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt right-aligned, the width rounded up to a
    multiple of `multiple` (masked columns on the left)."""
    width = max(len(p) for p in prompts)
    width = models.round_up(width, multiple)
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
        tokens = _sample(scaled, logprobs, params, generators)
        if bool(greedy.any()):
            tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _sample(
    scaled: torch.Tensor,
    logprobs: torch.Tensor,
    params: Sequence[Sampling],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """One token per row of temperature-scaled logits [B, V] (`logprobs`: their log-softmax),
    by inverting each row's CDF."""
    if any(p.top_k > 0 or 0.0 < p.top_p < 1.0 for p in params):
        filtered = torch.stack(
            [filter_logits(row, p.top_k, p.top_p) for row, p in zip(scaled, params, strict=True)]
        )
        probs = torch.softmax(filtered, dim=-1)
    else:  # unfiltered: the probabilities are exp(logprobs), one vocabulary pass fewer
        probs = logprobs.exp()
    cdf = probs.cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=g, dtype=cdf.dtype) for g in generators])
    # right=True skips zero-probability tokens even for a draw of exactly 0.
    sampled = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(1)
    return sampled.clamp(max=scaled.shape[-1] - 1)


# Called with (row, token, logprob) as each token is chosen: streaming and time-to-first-token.
OnToken = Callable[[int, int, float], None]


@dataclass(eq=False)
class Row:
    """One sequence of a `DecodeBatch`: its sampling, its answer so far, and its callbacks.

    `stop` gets the token ids so far after each token (True ends the row with `STOP`);
    `on_token` gets (token, logprob) as each token is chosen. `tag` is the caller's handle."""

    prompt: Sequence[int]
    sampling: Sampling
    stop: Callable[[list[int]], bool] | None = None
    on_token: Callable[[int, float], None] | None = None
    tag: object = None
    completion: Completion = field(default_factory=lambda: Completion([], []))
    generator: torch.Generator | None = None
    length: int = 0  # tokens of this row in the KV cache (its positions are 0 .. length-1)
    span: int = 0  # cache columns from this row's first token to the right edge (>= length)
    pending: int = -1  # the token chosen last, fed to the model at the next step

    @property
    def reservation(self) -> int:
        """KV-cache columns this row can ever occupy: prompt plus every new token."""
        return len(self.prompt) + self.sampling.max_new_tokens


class PrefixCache:
    """The KV cache of one prompt prefix that requests keep sharing (a chat template's system
    prompt, say), so joining rows prefill only what follows it.

    Learnt from traffic: when two prefills in a row share at least `min_tokens` leading tokens,
    the keys and values of that common prefix are kept (cut from the prefill that just computed
    them, no extra forward pass). Rows whose prompt starts with (part of) it reuse them; by
    causality the cache of a prefix's prefix is valid as it is."""

    def __init__(self, min_tokens: int = 16) -> None:
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.states: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, [1, H, P, D]
        self._last: Sequence[int] = ()
        self.hits = 0  # rows that reused it

    def shared(self, prompts: Sequence[Sequence[int]]) -> int:
        """Leading tokens every prompt shares with the cached prefix, if worth reusing (each
        prompt keeps at least one token of its own to compute the next token's logits)."""
        if not self.ids:
            return 0
        length = min(min(_common(p, self.ids), len(p) - 1) for p in prompts)
        return length if length >= self.min_tokens else 0

    def learn(self, prompts: Sequence[Sequence[int]], cache: DynamicCache, first: int) -> None:
        """After a full prefill: keep the prefix this batch shares with the last one. `first`:
        the cache column where the first prompt begins."""
        common = min(_common(p, self._last) for p in prompts) if self._last else 0
        self._last = prompts[-1]
        if common < self.min_tokens or self.ids[:common] == list(prompts[0][:common]):
            return
        self.ids = list(prompts[0][:common])
        self.states = [
            (
                layer.keys[:1, :, first : first + common].clone(),
                layer.values[:1, :, first : first + common].clone(),
            )
            for layer in cache.layers
        ]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


class DecodeBatch:
    """Rows decoding together on one model with one KV cache; rows join and leave between steps.

    The cache is right-aligned: row i's tokens lie in its last `span` columns (its prompt may
    be split by masked padding when it reused a shared prefix) and the columns before them are
    masked. Rows that join are prefilled together (their own forward pass; with a
    `PrefixCache`, only what follows the shared prefix) and their cache is laid beside the
    running rows' by left-padding the shorter of the two; a row that finishes leaves the cache
    at once (its columns are dropped, and leading columns no row uses are trimmed), so it costs
    nothing after its last token. Each row samples with its own parameters and generator, so a
    seeded row gives the same answer whoever its batch-mates are and whenever it joined.

    A prefill's width is rounded up to a multiple of `width_multiple` with masked columns;
    None picks `rlhf.models.width_multiple` of the model's weights: 16 below float32, else 1.
    Prompts of every length gave a bfloat16 model a prefill shape per request, and oneDNN a
    kernel to build and keep for each (SmolLM2, 1-8 random prompts of 5-200 tokens in
    process: resident memory 1.3 -> 2.3 GB in 150 s and growing; padded to 16, level near
    1.55 GB, and more calls done in the time). float32 products (MKL) keep no such cache.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        eos_ids: set[int],
        pad_id: int,
        prefixes: PrefixCache | None = None,
        width_multiple: int | None = None,
    ) -> None:
        if width_multiple is None:
            width_multiple = models.width_multiple(next(model.parameters()).dtype)
        if width_multiple < 1:
            raise ValueError(f"width_multiple must be >= 1, got {width_multiple}")
        self.width_multiple = width_multiple
        self.model = model
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self._prefixes = prefixes
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self.steps = 0  # forward passes (prefills and decode steps) so far

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Columns of the KV cache (the longest row's span)."""
        return self._mask.shape[1]

    @torch.inference_mode()
    def join(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill `rows`, choose their first tokens and add them to the batch; returns the rows
        that finished already (they never enter the batch)."""
        if not rows:
            return []
        if any(not row.prompt for row in rows):
            raise ValueError("empty prompt")
        prompts = [row.prompt for row in rows]
        shared = self._prefixes.shared(prompts) if self._prefixes is not None else 0
        cache = DynamicCache()
        if shared:
            assert self._prefixes is not None
            for index, (keys, values) in enumerate(self._prefixes.states):
                size = (len(rows), -1, shared, -1)
                cache.update(
                    keys[:, :, :shared].expand(size), values[:, :, :shared].expand(size), index
                )
            self._prefixes.hits += len(rows)
        input_ids, attention = left_pad(
            [p[shared:] for p in prompts], self._pad_id, self.width_multiple
        )
        positions = (shared + attention.cumsum(-1) - 1).clamp(min=shared)
        if shared:
            attention = torch.cat([torch.ones((len(rows), shared), dtype=torch.long), attention], 1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # the prefill needs only the last position's logits
        )
        self.steps += 1
        if self._prefixes is not None and not shared:
            self._prefixes.learn(prompts, cache, attention.shape[1] - len(prompts[0]))
        for row in rows:
            row.length = len(row.prompt)
            row.span = attention.shape[1] if shared else row.length
            if row.generator is None:
                row.generator = _generator(row.sampling.seed)
        self._merge(rows, cache, attention)
        first = len(self.rows) - len(rows)
        return self._advance(out.logits[:, -1, :], first)

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One decode step for every row; returns the rows that finished (and left)."""
        if not self.rows:
            return []
        count = len(self.rows)
        input_ids = torch.tensor([[row.pending] for row in self.rows], dtype=torch.long)
        positions = torch.tensor([[row.length] for row in self.rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((count, 1), dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        self.steps += 1
        for row in self.rows:
            row.length += 1
            row.span += 1
        return self._advance(out.logits[:, -1, :], 0)

    def drop(self, rows: Sequence[Row]) -> None:
        """Take rows out of the batch before they finish (their requests were abandoned)."""
        doomed = set(map(id, rows))
        self._keep([i for i, row in enumerate(self.rows) if id(row) not in doomed])

    def _advance(self, logits: torch.Tensor, first: int) -> list[Row]:
        """Choose the next token of rows[first:] from their logits; finished rows leave."""
        rows = self.rows[first:]
        tokens, logprobs = pick_tokens(
            logits.float(), [r.sampling for r in rows], [r.generator for r in rows]
        )
        token_list, logprob_list = tokens.tolist(), logprobs.tolist()  # one copy, not per row
        finished: list[Row] = []
        for row, token, logprob in zip(rows, token_list, logprob_list, strict=True):
            if row.on_token is not None:
                row.on_token(token, logprob)
            completion = row.completion
            completion.token_ids.append(token)
            completion.logprobs.append(logprob)
            row.pending = token
            if token in self._eos_ids:
                completion.finish_reason = EOS
            elif row.stop is not None and row.stop(completion.token_ids):
                completion.finish_reason = STOP
            elif len(completion.token_ids) >= row.sampling.max_new_tokens:
                completion.finish_reason = LENGTH
            else:
                continue
            finished.append(row)
        if finished:
            done = set(map(id, finished))
            self._keep([i for i, row in enumerate(self.rows) if id(row) not in done])
        return finished

    def _layers(self, cache: DynamicCache) -> list:
        return list(cache.layers)

    def _merge(self, rows: Sequence[Row], cache: DynamicCache, attention: torch.Tensor) -> None:
        """Lay the new rows' cache beside the running rows', right-aligned."""
        if self._cache is None or not self.rows:
            self._cache, self._mask, self.rows = cache, attention, list(rows)
            return
        width = max(self.width, attention.shape[1])
        for old, new in zip(self._layers(self._cache), self._layers(cache), strict=True):
            old.keys = torch.cat([_left_pad_seq(old.keys, width), _left_pad_seq(new.keys, width)])
            old.values = torch.cat(
                [_left_pad_seq(old.values, width), _left_pad_seq(new.values, width)]
            )
        self._mask = torch.cat(
            [_left_pad_mask(self._mask, width), _left_pad_mask(attention, width)]
        )
        self.rows.extend(rows)

    def _keep(self, indices: list[int]) -> None:
        """Keep only rows[indices], and trim cache columns that no remaining row uses."""
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self._cache, self._mask = None, torch.zeros((0, 0), dtype=torch.long)
            return
        index = torch.tensor(indices, dtype=torch.long)
        mask = self._mask.index_select(0, index)
        start = self.width - max(row.span for row in self.rows)
        self._mask = mask[:, start:]
        assert self._cache is not None
        for layer in self._layers(self._cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def _left_pad_seq(states: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, S, D] states padded with zeros on the left of S up to `width` (masked columns)."""
    missing = width - states.shape[2]
    if missing == 0:
        return states
    return torch.nn.functional.pad(states, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: Sequence[Sampling],
    eos_ids: set[int],
    pad_id: int,
    stop_check: StopCheck | None = None,
    on_token: OnToken | None = None,
    stopping: Stopping | None = None,
) -> list[Completion]:
    """Sample a completion for each prompt (rows may differ in every sampling parameter).

    `stopping` is asked before each decoding step: True gives the whole batch up
    (`Interrupted`; a trainer's rollouts when its process is told to stop)."""
    if len(prompts) != len(params) or not prompts:
        raise ValueError("need one Sampling per prompt, and at least one prompt")
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
    rows = [
        Row(
            prompt,
            sampling,
            stop=_bound_stop(stop_check, index),
            on_token=_bound_on_token(on_token, index),
        )
        for index, (prompt, sampling) in enumerate(zip(prompts, params, strict=True))
    ]
    batch = DecodeBatch(model, eos_ids, pad_id)
    batch.join([row for row in rows if row.sampling.max_new_tokens > 0])
    steps = 0
    while batch:
        if stopping is not None and stopping():
            raise Interrupted(f"rollouts given up on stop after {steps} decoding steps")
        batch.step()
        steps += 1
    return [row.completion for row in rows]


def _bound_stop(check: StopCheck | None, index: int) -> Callable[[list[int]], bool] | None:
    return None if check is None else (lambda token_ids: check(index, token_ids))


def _bound_on_token(callback: OnToken | None, index: int) -> Callable[[int, float], None] | None:
    return None if callback is None else (lambda token, logprob: callback(index, token, logprob))


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
