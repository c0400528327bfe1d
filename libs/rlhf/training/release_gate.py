"""The release gate's measurements: a policy's answers to a fixed prompt set, and their means.

The release stage loads each policy it compares from the store and samples it here, in its own
process: generation serves only the incumbent and a candidate already in its canary, so it cannot
answer for a candidate before its canary. Every policy answers the same chats with the same seeds
(`GateSampler`), so incumbent and candidate differ by their weights, not by the dice. Each answer's
KL to the reference is one forward pass of the reference over it (no second sampling). Rewards come
from the reward service, both policies' answers scored by the same reward model version
(`gate_measures`); `rlhf.algorithms.release_gate.compare` judges.

`GATE_PROMPTS` is the shipped prompt set: everyday topics that neither the simulated users'
training questions nor the loop benchmark's held-out ones ask about (tests/unit/test_release_gate
checks), so no policy is judged on what it was trained on.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import decoding
from rlhf.algorithms.release_gate import GateMeasures, repeated_ngrams
from rlhf.clients import Scores
from rlhf.models import chat_text, encode_text
from rlhf.training.ppo import build_rollout, forward_policy

GATE_TOPICS = (
    "a surprise birthday party",
    "learning to swim",
    "a picnic in the park",
    "a new neighbour",
    "a snowy morning",
    "cooking for friends",
    "a museum visit",
    "a garden in spring",
)
GATE_TEMPLATES = ("Say something about {}.", "What would you tell a friend about {}?")
GATE_PROMPTS = tuple(t.format(topic) for topic in GATE_TOPICS for t in GATE_TEMPLATES)

TEMPERATURE = 0.8  # as the simulated users and the loop benchmark sample
SEED = 9_000  # answer i of the set is sampled with seed SEED + i, for every policy
MAX_PROMPTS = 512  # a prompt file longer than this is refused
MAX_PROMPT_CHARS = 2_000
CHUNK = 16  # answers decoded (and KL-scored) together


def load_prompts(path: str) -> tuple[str, ...]:
    """The prompts in `path`, one a line (blank lines skipped), or `GATE_PROMPTS` for ''.
    Raises ValueError for an empty or oversized file."""
    if not path:
        return GATE_PROMPTS
    lines = [line.strip() for line in Path(path).expanduser().read_text().splitlines()]
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    if len(prompts) > MAX_PROMPTS or max(len(p) for p in prompts) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"{path}: at most {MAX_PROMPTS} prompts of at most {MAX_PROMPT_CHARS} characters"
        )
    return prompts


@dataclass(frozen=True)
class Answers:
    """A policy's answers to the gate's prompt set, with what does not need a reward model."""

    prompts: list[str]  # the user's words, one per answer (what the reward model reads)
    texts: list[str]
    length: float  # mean tokens per answer
    repetition: float  # mean repeated token-bigram share
    kl: float  # mean k1 KL to the reference per answer, in nats


class GateSampler:
    """Samples any policy on the gate's chats: `samples` answers per prompt of at most
    `max_new_tokens`, at `TEMPERATURE`, seeded per answer."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        reference: PreTrainedModel,
        prompts: Sequence[str],
        samples: int,
        max_new_tokens: int,
    ) -> None:
        if samples < 1 or max_new_tokens < 1 or not prompts:
            raise ValueError("need prompts, samples >= 1 and max_new_tokens >= 1")
        self.tokenizer = tokenizer
        self.reference = reference.eval()
        self.prompts = [p for p in prompts for _ in range(samples)]
        chats = {p: chat_text(tokenizer, [{"role": "user", "content": p}]) for p in prompts}
        self.prompt_ids = [encode_text(tokenizer, chats[p]) for p in self.prompts]
        self.params = [
            decoding.Sampling(max_new_tokens=max_new_tokens, temperature=TEMPERATURE, seed=SEED + i)
            for i in range(len(self.prompts))
        ]

    def answers(self, policy: PreTrainedModel) -> Answers:
        """`policy`'s answers and their length, repetition and KL to the reference."""
        eos = {self.tokenizer.eos_token_id}
        pad = self.tokenizer.pad_token_id
        completions: list[decoding.Completion] = []
        kls: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(self.prompts), CHUNK):
                prompts = self.prompt_ids[start : start + CHUNK]
                chunk = decoding.generate(
                    policy.eval(), prompts, self.params[start : start + CHUNK], eos, pad
                )
                completions += chunk
                kls += answer_kls(
                    self.reference,
                    self.tokenizer,
                    prompts,
                    [c.token_ids for c in chunk],
                    [c.logprobs for c in chunk],
                    TEMPERATURE,
                )
        responses = [c.token_ids for c in completions]
        return Answers(
            prompts=list(self.prompts),
            texts=self.tokenizer.batch_decode(responses, skip_special_tokens=True),
            length=statistics.fmean(len(r) for r in responses),
            repetition=statistics.fmean(repeated_ngrams(r) for r in responses),
            kl=statistics.fmean(kls),
        )


def answer_kls(
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    temperature: float,
) -> list[float]:
    """Per answer, its k1 KL to `reference`: the sum over its tokens of the logprob it was
    sampled with (`logprobs`, at `temperature`) minus the reference's at the same temperature,
    from one forward pass of the reference (0 for an empty answer: nothing diverged)."""
    rows = [i for i, r in enumerate(responses) if r]
    out = [0.0] * len(responses)
    if not rows:
        return out
    rollout = build_rollout(
        [prompts[i] for i in rows],
        [responses[i] for i in rows],
        [0.0] * len(rows),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    with torch.inference_mode():
        theirs, _, _ = forward_policy(
            reference,
            None,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.prompt_width,
            temperature,
            with_entropy=False,
        )
    for row, i in enumerate(rows):
        n = len(responses[i])
        out[i] = sum(logprobs[i][:n]) - theirs[row, :n].sum().item()
    return out


def gate_measures(
    candidate: Answers, incumbent: Answers, score: Callable[[list[str], list[str]], Scores]
) -> tuple[GateMeasures, GateMeasures, int]:
    """Both policies' measures, their answers scored in one call to `score` (the reward
    service: one reward model version for both, the oldest if a hot swap lands mid-call) and
    that version; a reward of None for both when it is 0 (no reward model trained yet)."""
    scored = score(candidate.prompts + incumbent.prompts, candidate.texts + incumbent.texts)
    split = len(candidate.texts)
    rewards = (scored.values[:split], scored.values[split:])
    out = []
    for answers, values in zip((candidate, incumbent), rewards, strict=True):
        reward = statistics.fmean(values) if scored.model_version else None
        sd = statistics.pstdev(values) if scored.model_version and len(values) > 1 else 0.0
        out.append(GateMeasures(reward, answers.length, answers.repetition, answers.kl, sd))
    return out[0], out[1], scored.model_version
